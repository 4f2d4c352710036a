"""`phi3v create-random`: a random-weight checkpoint in the real layout, with the real tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import PhiMoEConfig, config_from_dict, read_json
from .errors import CheckpointError
from .loader import parse_dtype, save_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json")
RANDOM_MARKER = "phi3v_random_weights"  # config.json key that marks the weights as random


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


def random_state_dict(cfg, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Weights under the checkpoint's own names (PhiMoE experts unstacked), drawn with a fixed seed."""
    from .model import CausalLM

    g = torch.Generator().manual_seed(seed)
    model = CausalLM(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or "layernorm.weight" in name:
            t = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(p.shape, generator=g)
        else:
            t = std * torch.randn(p.shape, generator=g)
        state[name] = t
    if isinstance(cfg, PhiMoEConfig):
        for name in [k for k in state if ".experts.w" in k]:
            stacked = state.pop(name)
            head, w = name.rsplit(".", 1)
            for e in range(stacked.shape[0]):
                state[f"{head}.{e}.{w}.weight"] = stacked[e]
    return state


def create_random(like: str | Path, out: str | Path, *, seed: int = 0, std: float = 0.02, dtype: str = "bfloat16",
                  layers: int | None = None, hidden: int | None = None, heads: int | None = None,
                  kv_heads: int | None = None, intermediate: int | None = None, experts: int | None = None,
                  original_max: int | None = None, sliding_window: int | None = None,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """Write a random-weight checkpoint shaped like `like` (a config.json or a model folder) to `out`."""
    like = Path(like)
    src_dir = like if like.is_dir() else like.parent
    cfg_path = like / "config.json" if like.is_dir() else like
    d = derive_config(read_json(cfg_path, "config.json"), layers, hidden, heads, kv_heads, intermediate, experts,
                      original_max, sliding_window)
    if "Phi3VForCausalLM" in (d.get("architectures") or []):
        raise CheckpointError("random Phi-3-vision checkpoints are not supported yet; use a text config")
    cfg = config_from_dict(d)
    d[RANDOM_MARKER] = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(cfg, seed, std)
    torch_dtype = parse_dtype(dtype)
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    save_safetensors(state, out, max_shard_bytes)
    d["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(d, indent=2))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
    return out
