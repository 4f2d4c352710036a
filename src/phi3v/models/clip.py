"""Phi-3(.5)-vision image embedding: a CLIP ViT tower, the 2x2 HD merge with learnable separators, an MLP projector.

Notation: N crops, T tokens per crop (1 CLS + P patches), C CLIP width, nh heads, hd head dim, H decoder width,
s = merged tokens per crop side (image_size / patch_size / 2, 12 for CLIP ViT-L/14-336).
Module names equal the checkpoint's under `model.vision_embed_tokens.` so safetensors load with no renaming.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from phi3v.errors import CheckpointError, InputError
from phi3v.image_processing import MERGE



@dataclass
class CLIPVisionConfig:
    """The keys of `img_processor.vision_config`; the defaults are openai/clip-vit-large-patch14-336."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


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
    def from_config(cls, config: dict) -> "ImageEmbeddingConfig":
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


# --------------------------------------------------------------------------- CLIP vision tower

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (p(x).view(B, T, self.n_head, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd), no mask: every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        C, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(C))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2 + 1, C)  # the checkpoint has no position_ids

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, P, C), patches row-major
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (N, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, T, C)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, the checkpoint's spelling
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # stored, unused by Phi-3-vision

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """hidden_states[num_layers] of the HF CLIP tower: (N, 3, S, S) -> (N, T, C); later layers are not run."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        return self.vision_model(pixel_values, num_layers)


# --------------------------------------------------------------------------- Phi-3-vision image embedding

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
