"""`phi3v quantize`'s converter: a float checkpoint folder -> a weight-only int8/int4 one (the spec in config.json).
Loading the result needs only phi3v.quant.layers (through load.load_causal_lm), never this module."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, InputError
from ..models import config_from_dict
from ..models.config import read_json
from ..quant.layers import check_scheme, quantize_model
from .files import copy_tokenizer_files
from .hub import resolve_model_dir
from .load import load_causal_lm, parse_dtype
from .safetensors import save_safetensors


def save_quantized(model: nn.Module, spec: dict, src_dir, out_dir) -> Path:
    """Write the quantized weights under the model's own names, config.json of src_dir with the "quantization"
    entry, and src_dir's tokenizer/processor files. Weight files already in out_dir are replaced."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise InputError(f"write the quantized checkpoint to a new folder, not over its source {src_dir}")
    raw = read_json(src_dir / "config.json", "config.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    save_safetensors(model.state_dict(), out_dir)
    raw["quantization"] = spec
    raw["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    copy_tokenizer_files(src_dir, out_dir)
    return out_dir


def quantize_checkpoint(model_dir, out_dir, scheme: str = "int8", group_size: int = 128, include_vision: bool = True,
                        dtype: str = "bfloat16") -> dict:
    """Load a float checkpoint in dtype, quantize it and write it to out_dir; return the spec."""
    check_scheme(scheme, group_size)
    src = resolve_model_dir(model_dir)
    raw = read_json(src / "config.json", "config.json")
    if "quantization" in raw:
        raise CheckpointError(f"{src} is already quantized ({raw['quantization']}); quantize the float checkpoint")
    model = load_causal_lm(src, config_from_dict(raw), parse_dtype(dtype), raw=raw)
    spec = quantize_model(model, scheme, group_size, include_vision, pack=False)  # saved, not run: no kernel copies
    save_quantized(model, spec, src, out_dir)
    return spec
