"""Strict loading: build the model on the meta device, then assign every tensor of the checkpoint, each key and
shape checked (no strict=False, no shape guessing)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import build_model
from ..models.config import Phi3Config
from ..quant.layers import pack_for_kernels, quantize_from_spec
from .safetensors import read_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


def load_into(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path) -> nn.Module:
    """Strictly load `state` into a model built on the meta device: every key and shape must match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"weights in {where} do not match config.json: " + "; ".join(parts))
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"weight {k} in {where} has shape {tuple(state[k].shape)} but config.json implies {tuple(t.shape)}"
            )
    state = {k: (v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype)) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model



def load_causal_lm(model_dir: Path, cfg: Phi3Config, dtype: torch.dtype = torch.float32, device="cpu",
                   raw: dict | None = None):
    """Build the model on the meta device and load the checkpoint's weights into it strictly."""
    with torch.device("meta"):
        model = build_model(cfg, raw)
    quantized = raw is not None and "quantization" in raw
    if quantized:  # empty quantized modules, named as the checkpoint's tensors, before the strict load
        quantize_from_spec(model, raw["quantization"])
    state = type(model).sanitize(cfg, read_state_dict(model_dir))
    if cfg.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_into(model, state, dtype, model_dir)
    model.rotary = type(model.rotary)(cfg)  # non-persistent buffers are rebuilt, not loaded
    model = model.to(device).eval()
    return pack_for_kernels(model) if quantized else model  # kernel layouts are device specific: built here
