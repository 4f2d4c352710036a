"""`phi3v create-random`: a random-weight checkpoint in the real layout, with the real tokenizer files.

Text (Phi3ForCausalLM, PhiMoEForCausalLM) and Phi-3(.5)-vision (Phi3VForCausalLM) configs are supported; the weights are
drawn for every parameter of the model `loader.build_model` builds, under the checkpoint's own names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import PhiMoEConfig, config_from_dict, read_json
from .errors import CheckpointError
from .image_processing import CROP_SIZE, PATCH_SIZE
from .loader import build_model, parse_dtype, save_safetensors
from .model import RMSNorm
from .multimodal import is_vision_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json")
RANDOM_MARKER = "phi3v_random_weights"  # config.json key that marks the weights as random
# The fixtures' tiny CLIP (shared/fixtures/phi3v/README.md): used when the decoder is shrunk and no CLIP size is given.
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}
CLIP_FIXED = {"image_size": CROP_SIZE, "patch_size": PATCH_SIZE, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
NORM_STD, BIAS_STD, GN_STD = 0.1, 0.05, 0.3  # norm weights 1 + N(0, .1); biases; glb_GN / sub_GN (as the fixtures)


def _resample(factors: list[float], n: int) -> list[float]:
    """Pick n of the LongRoPE factors evenly (entries 0, k, 2k, ...) when the head dim is cut down."""
    if len(factors) == n:
        return list(factors)
    return [factors[i * len(factors) // n] for i in range(n)]


def derive_config(base: dict, layers=None, hidden=None, heads=None, kv_heads=None, intermediate=None,
                  experts=None, original_max=None, sliding_window=None) -> dict:
    """config.json of the source with the given sizes replaced; LongRoPE factor lists follow the head dim."""
    d = json.loads(json.dumps(base))
    for key, val in (("num_hidden_layers", layers), ("hidden_size", hidden), ("num_attention_heads", heads),
                     ("num_key_value_heads", kv_heads), ("intermediate_size", intermediate),
                     ("num_local_experts", experts), ("original_max_position_embeddings", original_max),
                     ("sliding_window", sliding_window)):
        if val is not None:
            d[key] = val
    if heads is not None and kv_heads is None:
        d["num_key_value_heads"] = heads
    head_dim = d["hidden_size"] // d["num_attention_heads"]
    rs = d.get("rope_scaling")
    if isinstance(rs, dict) and "short_factor" in rs:
        rs["short_factor"] = _resample(rs["short_factor"], head_dim // 2)
        rs["long_factor"] = _resample(rs["long_factor"], head_dim // 2)
        if "original_max_position_embeddings" in rs and original_max is not None:
            rs["original_max_position_embeddings"] = original_max
    d["torch_dtype"] = d.get("torch_dtype", "bfloat16")
    return d


def derive_vision_config(d: dict, shrink: bool, layers=None, hidden=None, heads=None, intermediate=None) -> dict:
    """Set `img_processor.vision_config` of a Phi-3-vision config.json in place: the given CLIP sizes over the
    source's vision_config (or SMALL_CLIP) when `shrink` or a size is given; else keep it (none = real ViT-L/14-336)."""
    given = {k: v for k, v in (("num_hidden_layers", layers), ("hidden_size", hidden), ("num_attention_heads", heads),
                               ("intermediate_size", intermediate)) if v is not None}
    ip = d["img_processor"]
    if not (shrink or given):
        return d
    vc = {**SMALL_CLIP, **CLIP_FIXED, **ip.get("vision_config", {}), **given}
    if vc["hidden_size"] % vc["num_attention_heads"]:
        raise CheckpointError(f"CLIP width {vc['hidden_size']} is not a multiple of its {vc['num_attention_heads']} "
                              "heads; pick --vision-hidden and --vision-heads that divide")
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
    if isinstance(cfg, PhiMoEConfig):
        for name in [k for k in state if ".experts.w" in k]:
            stacked = state.pop(name)
            head, w = name.rsplit(".", 1)
            for e in range(stacked.shape[0]):
                state[f"{head}.{e}.{w}.weight"] = stacked[e].clone()  # own storage: safetensors refuses shared views
    return state


def create_random(like: str | Path, out: str | Path, *, seed: int = 0, std: float = 0.02, dtype: str = "bfloat16",
                  layers: int | None = None, hidden: int | None = None, heads: int | None = None,
                  kv_heads: int | None = None, intermediate: int | None = None, experts: int | None = None,
                  original_max: int | None = None, sliding_window: int | None = None,
                  vision_layers: int | None = None, vision_hidden: int | None = None,
                  vision_heads: int | None = None, vision_intermediate: int | None = None,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight checkpoint shaped like `like` (a config.json or a model folder) to `out`. For
    Phi-3(.5)-vision a shrunk decoder gets the fixtures' small CLIP unless vision_* sizes are given."""
    like = Path(like)
    src_dir = like if like.is_dir() else like.parent
    cfg_path = like / "config.json" if like.is_dir() else like
    d = derive_config(read_json(cfg_path, "config.json"), layers, hidden, heads, kv_heads, intermediate, experts,
                      original_max, sliding_window)
    vision = (vision_layers, vision_hidden, vision_heads, vision_intermediate)
    if is_vision_config(d):
        shrink = any(v is not None for v in (layers, hidden, heads, kv_heads, intermediate))
        derive_vision_config(d, shrink, *vision)
    elif any(v is not None for v in vision):
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
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
    return out
