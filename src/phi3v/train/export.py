"""The final model of a run as a Hugging Face checkpoint folder: config.json, safetensors, tokenizer and processor
files, loadable by `phi3v.load` and, for the text models, by transformers' Phi3ForCausalLM / PhimoeForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phi3v.checkpoint.files import copy_tokenizer_files
from phi3v.checkpoint.random import RANDOM_MARKER
from phi3v.checkpoint.safetensors import save_safetensors
from phi3v.models.config import read_json
from phi3v.models.phimoe import PhiMoEForCausalLM
from phi3v.processing.image import PREPROCESSOR_CONFIG


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names: PhiMoE's stacked experts split back into one tensor each."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, PhiMoEForCausalLM):
        for name in [k for k in state if ".experts.w" in k]:
            stacked = state.pop(name)
            head, w = name.rsplit(".", 1)
            for e in range(stacked.shape[0]):
                state[f"{head}.{e}.{w}.weight"] = stacked[e].clone()  # own storage: safetensors refuses views
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.contiguous() for k, v in state.items()}


def export_hf(model: torch.nn.Module, raw_config: dict, src_dir: str | Path, out_dir: str | Path, *,
              num_crops: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` into out_dir in the Hugging Face layout; the tokenizer and processor files come from src_dir,
    for Phi-3-vision a preprocessor_config.json
    with the num_crops trained with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model, dtype)
    for old in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a previous export with another sharding must not mix in
    save_safetensors(state, out)
    config = {k: v for k, v in raw_config.items() if k != RANDOM_MARKER}  # trained weights are no longer random
    first = next(iter(state.values()))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer_files(src_dir, out)
    pre = out / PREPROCESSOR_CONFIG
    if num_crops is not None:  # Phi-3-vision: the processor must cut images as in training
        d = read_json(pre, PREPROCESSOR_CONFIG) if pre.is_file() else {}
        d["num_crops"] = num_crops
        pre.write_text(json.dumps(d, indent=2))
    return out
