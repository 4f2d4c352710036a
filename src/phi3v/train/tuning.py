"""The recipe's adapter and DPO steps, called by run.py: attach (Q)LoRA after loading, read preference pairs, build
the DPO loss with its reference, and at the end save the adapter alone plus, over a float base, the merged model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from phi3v.errors import InputError
from phi3v.models.phimoe import Experts
from phi3v.quant.layers import quantize_model

from .dpo import (
    REFERENCE_FILE, DPOConfig, dpo_loss, frozen_copy, load_reference, precompute_reference, save_reference,
)
from .lora import apply_lora, disable_adapters, lora_layers, remove_lora, save_adapter, select_targets

ADAPTER_DIR = "adapter"  # OUT/adapter: adapter_config.json + adapter_model.safetensors


def attach_adapters(model: nn.Module, cfg) -> list[str]:
    """With cfg.lora_r: quantize the target linears (cfg.qlora: QLoRA) and wrap them in LoRA; [] without."""
    if not cfg.lora_r:
        return []
    names = select_targets(model, cfg.lora_targets)
    if cfg.qlora:
        if any(isinstance(m, Experts) for m in model.modules()):
            raise InputError("QLoRA over PhiMoE's experts is not supported: train LoRA on the float model "
                             "(drop --qlora)")
        # only the wrapped layers are quantized: their LoRA wrapper dequantizes for the backward pass, which the
        # int kernels lack (the lm_head stays float, as in QLoRA)
        others = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(names)
        quantize_model(model, cfg.qlora, cfg.qlora_group_size, include_vision=True, skip=others)
    return apply_lora(model, names, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)


def dpo_config(cfg) -> DPOConfig:
    ref = cfg.ref or ("adapters" if cfg.lora_r else "copy")
    d = DPOConfig(cfg.beta, cfg.dpo_loss, cfg.label_smoothing, cfg.sft_weight, ref)
    d.check()
    if ref == "adapters" and not cfg.lora_r:
        raise InputError("--ref adapters needs --lora-r (the reference is the base with adapters off); full "
                         "fine-tuning uses --ref copy or --ref precomputed")
    return d


def make_dpo_loss(setup):
    """The DPO loss of a run; called before a resumed checkpoint is loaded, so the model is still the reference.
    A precomputed table is written to OUT once and read back by resumed runs."""
    cfg, model = setup.cfg, setup.model
    d = dpo_config(cfg)
    ref_model = frozen_copy(model) if d.ref == "copy" else None
    table = None
    if d.ref == "precomputed":
        pairs = list(setup.samples) + list(setup.eval_samples)  # indices 0..N-1 across both
        path = Path(cfg.out) / REFERENCE_FILE
        if cfg.resume and path.is_file():
            table = load_reference(path, len(pairs))
        else:
            with disable_adapters(model):
                table = precompute_reference(model, pairs, setup.collate, cfg.batch, device=setup.device)
            save_reference(table, path)
    return dpo_loss(d, ref_model=ref_model, table=table, checkpointing=cfg.activation_checkpointing)


def finish_adapters(model: nn.Module, out: str | Path, base_model: str | Path) -> nn.Module | None:
    """Save OUT/adapter; return the model with the adapters merged into plain linears for the Hugging Face
    export, or None when the base is quantized (QLoRA: the adapter is the result)."""
    if not lora_layers(model):
        return model
    save_adapter(model, Path(out) / ADAPTER_DIR, base_model=str(base_model))
    if any(m.quantized for m in lora_layers(model).values()):
        return None
    with torch.no_grad():
        return remove_lora(model, merge=True)
