"""Phi-3(.5)-vision (Phi3VForCausalLM): the Phi-3 decoder plus `model.vision_embed_tokens`, which turns images into
rows spliced into the prompt at placeholder ids (< 0): a CLIP tower, the 2x2 HD merge with learnable separators
(sub_GN ends every row of merged tokens, glb_GN separates the crops from the global view) and an MLP projector.

Notation: N crops, P patches per crop, C CLIP width, H decoder width,
s = merged tokens per crop side (image_size / patch_size / MERGE: 12 for CLIP ViT-L/14-336).
Module names equal the checkpoint's under `model.vision_embed_tokens.` so safetensors load with no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .clip import ACT, CLIPVisionConfig, CLIPVisionModel
from .config import Phi3Config
from .phi3 import Phi3ForCausalLM

MERGE = 2  # 2 x 2 neighbouring patches are concatenated into one image token
VISION_ARCHITECTURES = ("Phi3VForCausalLM",)
# The tied copy of embed_tokens that some exports store; the reference never stores it.
TIED_WTE = "model.vision_embed_tokens.wte.weight"


def is_vision_config(d: dict) -> bool:
    return any(a in VISION_ARCHITECTURES for a in d.get("architectures") or [])


def recomputes_on_long_switch(model_dir: Path) -> bool:
    """Phi-3.5-vision's reference recomputes the cache when generation crosses original_max_position_embeddings;
    Phi-3-vision's does not (its cached keys keep the short factors). Phi-3.5-vision ships processor_config.json,
    Phi-3-vision does not: that file tells the two reference behaviours apart."""
    return (model_dir / "processor_config.json").is_file()


@dataclass
class ImageEmbeddingConfig:
    """What Phi3ImageEmbedding needs from a Phi3V config.json (`hidden_size`, `img_processor`, `embd_layer`)."""

    hidden_size: int  # decoder width H
    image_dim_out: int  # CLIP width C
    num_img_tokens: int  # merged tokens per crop, s*s
    layer_idx: int = -2  # index into CLIP's hidden_states (0 = embeddings after pre_layrnorm)
    type_feature: str = "patch"
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)

    @classmethod
    def from_config(cls, config: dict) -> ImageEmbeddingConfig:
        """Build from a config.json dict; raise CheckpointError for what the reference does not support."""
        ip, el = config.get("img_processor"), config.get("embd_layer")
        if not isinstance(ip, dict) or not isinstance(el, dict):
            raise CheckpointError("config.json has no `img_processor`/`embd_layer` dicts: not Phi-3-vision")
        # Defaults are the reference code's (`kwargs.get(...)` in image_embedding_phi3_v.py).
        supported = {
            "img_processor.name": (ip.get("name"), "clip_vision_model"),
            "embd_layer.embedding_cls": (el.get("embedding_cls"), "image"),
            "embd_layer.use_hd_transform": (el.get("use_hd_transform", False), True),
            "embd_layer.with_learnable_separator": (el.get("with_learnable_separator", False), True),
            "embd_layer.hd_transform_order": (el.get("hd_transform_order", "glb_sub"), "sub_glb"),
            "embd_layer.projection_cls": (el.get("projection_cls", "linear"), "mlp"),
            "img_processor.type_feature": (ip.get("type_feature", "patch"), "patch"),
        }
        for key, (got, want) in supported.items():
            if got != want:
                raise CheckpointError(f"config.json {key} is {got!r}; only {want!r} (Phi-3/3.5-vision) is supported")
        vision = CLIPVisionConfig.from_dict(ip.get("vision_config", {}))
        cfg = cls(
            hidden_size=config["hidden_size"],
            image_dim_out=ip["image_dim_out"],
            num_img_tokens=ip["num_img_tokens"],
            layer_idx=ip.get("layer_idx", -2),
            vision=vision,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        v = self.vision
        if self.image_dim_out != v.hidden_size:
            raise CheckpointError(f"img_processor.image_dim_out {self.image_dim_out} != CLIP width {v.hidden_size}")
        if v.image_size % v.patch_size or v.patches_per_side % MERGE:
            raise CheckpointError(f"CLIP image_size {v.image_size} is not an even multiple of patch {v.patch_size}")
        if self.num_img_tokens != self.side**2:
            raise CheckpointError(f"img_processor.num_img_tokens {self.num_img_tokens} != {self.side}**2 merged tokens")
        if not -(v.num_hidden_layers + 1) <= self.layer_idx <= v.num_hidden_layers:
            raise CheckpointError(f"img_processor.layer_idx {self.layer_idx} is out of range for {v.num_hidden_layers}")
        if v.hidden_act not in ACT:
            raise CheckpointError(f"CLIP hidden_act {v.hidden_act!r} is not one of {sorted(ACT)}")

    @property
    def side(self) -> int:
        return self.vision.patches_per_side // MERGE

    @property
    def num_layers_run(self) -> int:
        """CLIP encoder layers to run so that the output is hidden_states[layer_idx]."""
        return self.layer_idx % (self.vision.num_hidden_layers + 1)


class Phi3ImageEmbedding(nn.Module):
    """HD crops -> rows of decoder-width image features (`model.vision_embed_tokens`, without the tied `wte`)."""

    def __init__(self, cfg: ImageEmbeddingConfig):
        super().__init__()
        self.cfg = cfg
        C4 = cfg.image_dim_out * MERGE**2
        self.img_processor = CLIPVisionModel(cfg.vision)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, C4))  # separates the sub-image grid from the global crop
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, C4))  # ends every row of merged tokens ("newline")
        H = cfg.hidden_size
        self.img_projection = nn.Sequential(nn.Linear(C4, H), nn.GELU(), nn.Linear(H, H))  # exact-erf GELU

    def img_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden_states[layer_idx] without CLS: (N, 3, S, S) -> (N, P, C)."""
        dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        return self.img_processor(pixel_values.to(dtype), self.cfg.num_layers_run)[:, 1:]

    def merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, P, C) -> (N, s, s, 4C); channels are patches (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1)."""
        N, _, C = feats.shape
        s = self.cfg.side
        x = feats.reshape(N, s, MERGE, s, MERGE, C).permute(0, 1, 3, 2, 4, 5)  # (N, s, s, 2, 2, C)
        return x.reshape(N, s, s, MERGE * MERGE * C)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols, 4C) -> (rows * (cols + 1), 4C): a sub_GN token after every row."""
        sep = self.sub_GN[0].expand(grid.shape[0], 1, -1)  # (rows, 1, 4C)
        return torch.cat([grid, sep], dim=1).flatten(0, 1)

    def hd_rows(self, merged: torch.Tensor, h_c: int, w_c: int) -> torch.Tensor:
        """Merged tokens of one image, (1 + h_c*w_c, s, s, 4C) with crop 0 global -> (rows, 4C) in 'sub_glb' order."""
        s, C4 = self.cfg.side, merged.shape[-1]
        glb, sub = merged[0], merged[1:]
        sub = sub.reshape(h_c, w_c, s, s, C4).permute(0, 2, 1, 3, 4).reshape(h_c * s, w_c * s, C4)  # crops row-major
        return torch.cat([self.with_newlines(sub), self.glb_GN[0], self.with_newlines(glb)], dim=0)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (n_img, n_crops+1, 3, S, S), image_sizes (n_img, 2) = padded HD (height, width)
        -> one (num_image_tokens, H) tensor per image."""
        n_img, n_crops1 = pixel_values.shape[:2]
        if n_img == 0:
            return []
        S = self.cfg.vision.image_size
        grids = [(h // S, w // S) for h, w in image_sizes.view(-1, 2).tolist()]  # host sync, once per batch of images
        if len(grids) != n_img or any(h_c < 1 or w_c < 1 or h_c * w_c + 1 > n_crops1 for h_c, w_c in grids):
            raise InputError(f"image_sizes {image_sizes.tolist()} do not fit pixel_values {tuple(pixel_values.shape)}: "
                             f"each must be a padded HD (height, width) whose {S}x{S} crops fit in n_crops")
        # Only the real crops (global + h_c*w_c) go through CLIP, all images in one batch; padding crops are skipped.
        n_real = [1 + h_c * w_c for h_c, w_c in grids]
        crops = torch.cat([pixel_values[i, :n] for i, n in enumerate(n_real)])  # (N, 3, S, S)
        merged = self.merge_2x2(self.img_features(crops)).split(n_real)  # per image (1 + h_c*w_c, s, s, 4C)
        rows = [self.hd_rows(m, h_c, w_c) for m, (h_c, w_c) in zip(merged, grids)]
        out = self.img_projection(torch.cat(rows))  # (sum of rows, H), one projection for all images
        return list(out.split([r.shape[0] for r in rows]))

class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi3VForCausalLM: `model.vision_embed_tokens` turns images into rows spliced at placeholder ids (< 0)."""

    def __init__(self, cfg: Phi3Config, vision: ImageEmbeddingConfig):
        super().__init__(cfg)
        self.model.vision_embed_tokens = Phi3ImageEmbedding(vision)

    @classmethod
    def from_config(cls, cfg: Phi3Config, raw: dict | None = None) -> Phi3VForCausalLM:
        if raw is None:
            raise CheckpointError("Phi3VForCausalLM needs the whole config.json (its img_processor and embd_layer)")
        return cls(cfg, ImageEmbeddingConfig.from_config(raw))

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, features=None) -> torch.Tensor:
        """(B, T) ids with image placeholders -> (B, T, C) embeddings; image k's rows go to its -k run.
        `features` (one (rows, C) tensor per image) skips the vision tower when they are already known."""
        x = self.model.embed_tokens(input_ids.clamp_min(0))
        where = input_ids < 0
        n_slots = int(where.sum())
        if n_slots == 0:
            return x
        if pixel_values is None and features is None:
            raise InputError("the prompt has image placeholders but no images were given")
        if input_ids.shape[0] != 1:
            raise InputError("embed one prompt with images at a time (rows do not share images)")
        feats = features if features is not None else self.model.vision_embed_tokens(pixel_values, image_sizes)
        # rows of all images in the order their placeholder runs appear (image k fills the run of -k)
        order = [-int(v) for v in torch.unique_consecutive(input_ids[where])]
        rows = torch.cat([feats[k - 1] for k in order]) if order else x.new_zeros(0, x.shape[-1])
        if rows.shape[0] != n_slots:
            raise InputError(f"the prompt has {n_slots} image placeholder tokens but the images give {rows.shape[0]} "
                             "feature rows; build prompts with the same num_crops as the images")
        x = x.clone()
        x[where] = rows.to(x.dtype)
        return x

    @staticmethod
    def sanitize(cfg, state):
        state.pop(TIED_WTE, None)
        return Phi3ForCausalLM.sanitize(cfg, state)
