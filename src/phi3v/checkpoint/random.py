"""`phi3v create-random`: a random-weight checkpoint in the real layout, with the real tokenizer files.

Text (Phi3ForCausalLM, PhiMoEForCausalLM) and Phi-3(.5)-vision (Phi3VForCausalLM) configs are supported; the weights are
drawn for every parameter of the model `models.build_model` builds, under the checkpoint's own names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import build_model, config_from_dict, is_vision_config
from ..models.clip import CROP_SIZE, PATCH_SIZE
from ..models.config import read_json
from ..models.layers import RMSNorm
from ..models.phi3_v import MERGE
from ..models.phimoe import PhiMoEForCausalLM
from .files import TOKENIZER_FILES, copy_tokenizer_files
from .load import parse_dtype
from .safetensors import save_safetensors

__all__ = ["RANDOM_MARKER", "SMALL_CLIP", "TOKENIZER_FILES", "Sizes", "create_random", "derive_config",
           "random_state_dict"]

RANDOM_MARKER = "phi3v_random_weights"  # config.json key that marks the weights as random
# The fixtures' tiny CLIP (shared/fixtures/phi3v/README.md): used when the decoder is shrunk and no CLIP size is given.
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}
# CLIP keys a resized tower keeps from the source (or these defaults) unless Sizes gives vision_image_size/patch_size
CLIP_DEFAULTS = {"image_size": CROP_SIZE, "patch_size": PATCH_SIZE, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
NORM_STD, BIAS_STD, GN_STD = 0.1, 0.05, 0.3  # norm weights 1 + N(0, .1); biases; glb_GN / sub_GN (as the fixtures)


def _resample(factors: list[float], n: int) -> list[float]:
    """Pick n of the LongRoPE factors evenly (entries 0, k, 2k, ...) when the head dim is cut down."""
    if len(factors) == n:
        return list(factors)
    return [factors[i * len(factors) // n] for i in range(n)]


@dataclass(frozen=True)
class Sizes:
    """Sizes that replace the source config's (None keeps it). The vision_* sizes are CLIP's (Phi-3-vision only)."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    experts: int | None = None
    original_max: int | None = None
    sliding_window: int | None = None
    vision_layers: int | None = None
    vision_hidden: int | None = None
    vision_heads: int | None = None
    vision_intermediate: int | None = None
    vision_image_size: int | None = None  # the crop side S (every HD crop and the global view are S x S)
    vision_patch_size: int | None = None

    DECODER_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                    "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size",
                    "experts": "num_local_experts", "original_max": "original_max_position_embeddings",
                    "sliding_window": "sliding_window"}
    VISION_KEYS = {"vision_layers": "num_hidden_layers", "vision_hidden": "hidden_size",
                   "vision_heads": "num_attention_heads", "vision_intermediate": "intermediate_size",
                   "vision_image_size": "image_size", "vision_patch_size": "patch_size"}

    def given(self, keys: dict[str, str]) -> dict[str, int]:
        """{config.json key: size} of the sizes set among `keys`."""
        return {key: getattr(self, f) for f, key in keys.items() if getattr(self, f) is not None}

    @property
    def resizes_decoder(self) -> bool:
        return any(getattr(self, f) is not None for f in ("layers", "hidden", "heads", "kv_heads", "intermediate"))


def derive_config(base: dict, sizes: Sizes = Sizes()) -> dict:
    """config.json of the source with the given decoder sizes replaced; LongRoPE factor lists follow the head dim."""
    d = json.loads(json.dumps(base))
    d.update(sizes.given(Sizes.DECODER_KEYS))
    if sizes.heads is not None and sizes.kv_heads is None:
        d["num_key_value_heads"] = sizes.heads
    head_dim = d["hidden_size"] // d["num_attention_heads"]
    rs = d.get("rope_scaling")
    if isinstance(rs, dict) and "short_factor" in rs:
        rs["short_factor"] = _resample(rs["short_factor"], head_dim // 2)
        rs["long_factor"] = _resample(rs["long_factor"], head_dim // 2)
        if "original_max_position_embeddings" in rs and sizes.original_max is not None:
            rs["original_max_position_embeddings"] = sizes.original_max
    d["torch_dtype"] = d.get("torch_dtype", "bfloat16")
    return d


def derive_vision_config(d: dict, shrink: bool, sizes: Sizes = Sizes()) -> dict:
    """Set `img_processor.vision_config` of a Phi-3-vision config.json in place: the given CLIP sizes over the
    source's vision_config (or SMALL_CLIP) when `shrink` or a CLIP size is given; else keep it (none = the real
    ViT-L/14-336)."""
    given = sizes.given(Sizes.VISION_KEYS)
    ip = d["img_processor"]
    if not (shrink or given):
        return d
    vc = {**SMALL_CLIP, **CLIP_DEFAULTS, **ip.get("vision_config", {}), **given}
    if vc["hidden_size"] % vc["num_attention_heads"]:
        raise CheckpointError(f"CLIP width {vc['hidden_size']} is not a multiple of its {vc['num_attention_heads']} "
                              "heads; pick --vision-hidden and --vision-heads that divide")
    side, rest = divmod(vc["image_size"], vc["patch_size"])
    if rest or side % MERGE:
        raise CheckpointError(f"CLIP image size {vc['image_size']} is not an even multiple of patch size "
                              f"{vc['patch_size']} (the 2x2 merge needs an even patch grid); pick sizes that divide")
    ip["num_img_tokens"] = (side // MERGE) ** 2  # merged tokens per crop
    vc["projection_dim"] = vc["hidden_size"]  # stored by the reference config, unused by Phi-3-vision
    ip["vision_config"] = vc
    ip["image_dim_out"] = vc["hidden_size"]  # the HD merge concatenates 4 CLIP rows: glb_GN/sub_GN are 4x this wide
    return d


def random_state_dict(cfg, seed: int, std: float, raw: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights of `build_model(cfg, raw)` under the checkpoint's own names (PhiMoE experts unstacked), drawn in
    float32 with a fixed seed in parameter order, then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # only the names and shapes are needed
        model = build_model(cfg, raw)
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, RMSNorm))}
    state = {}
    for name, p in model.state_dict().items():
        t = torch.randn(p.shape, generator=g)
        if name in norms:
            t = 1 + NORM_STD * t
        elif name.endswith(".bias"):
            t = BIAS_STD * t
        elif name.endswith(("glb_GN", "sub_GN")):
            t = GN_STD * t
        else:
            t = std * t
        state[name] = t.to(dtype)
    if isinstance(model, PhiMoEForCausalLM):  # the checkpoint layout: one tensor per expert
        for name in [k for k in state if ".experts.w" in k]:
            stacked = state.pop(name)
            head, w = name.rsplit(".", 1)
            for e in range(stacked.shape[0]):
                state[f"{head}.{e}.{w}.weight"] = stacked[e].clone()  # own storage: safetensors refuses shared views
    return state


def create_random(like: str | Path, out: str | Path, sizes: Sizes | None = None, *, seed: int = 0, std: float = 0.02,
                  dtype: str = "bfloat16", max_shard_bytes: int = 2 << 30, **size_kw) -> Path:
    """Write a random-weight checkpoint shaped like `like` (a config.json or a model folder) to `out`, resized by
    `sizes` (or the same fields as keywords: layers=2, hidden=64, ...). For Phi-3(.5)-vision a resized decoder
    gets the fixtures' small CLIP unless vision_* sizes are given."""
    if sizes is None:
        try:
            sizes = Sizes(**size_kw)
        except TypeError as e:
            raise CheckpointError(f"create_random: {e}; the sizes are {[f.name for f in dataclasses.fields(Sizes)]}")
    elif size_kw:
        raise CheckpointError("create_random: pass the sizes either as `sizes` or as keywords, not both")
    like = Path(like)
    src_dir = like if like.is_dir() else like.parent
    cfg_path = like / "config.json" if like.is_dir() else like
    d = derive_config(read_json(cfg_path, "config.json"), sizes)
    if is_vision_config(d):
        derive_vision_config(d, sizes.resizes_decoder, sizes)
    elif sizes.given(Sizes.VISION_KEYS):
        raise CheckpointError(f"{cfg_path} is not a Phi-3-vision config: the vision sizes only apply to "
                              "Phi3VForCausalLM; drop them or pass a vision model's config")
    cfg = config_from_dict(d)
    d[RANDOM_MARKER] = True
    torch_dtype = parse_dtype(dtype)
    state = random_state_dict(cfg, seed, std, d, torch_dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out, max_shard_bytes)
    d["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(d, indent=2))
    copy_tokenizer_files(src_dir, out)
    return out
