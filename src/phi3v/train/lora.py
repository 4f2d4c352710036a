"""LoRA and QLoRA adapters swapped in from outside the model (mlx-lm's `LoRALinear.from_base`), saved alone in
peft's layout (`adapter_config.json` + `adapter_model.safetensors`, peft's key names) so peft can read them.

Notation: N out features, K in features, r adapter rank. y = base(x) + (alpha / r) * B(A(dropout(x))),
A (r, K) initialised as nn.Linear (peft's kaiming-uniform), B (N, r) zeros, so a new adapter changes nothing.
A quantized base (int8 / int4 of phi3v.quant.layers) stays quantized and frozen: QLoRA.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phi3v.checkpoint.safetensors import SafetensorsFile, save_file
from phi3v.errors import CheckpointError, InputError
from phi3v.models.config import read_json
from phi3v.models.phi3_v import Phi3ImageEmbedding
from phi3v.quant.layers import WeightOnlyInt4Linear, WeightOnlyInt8Linear, dequantize_int4

DECODER_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PROJECTOR_TARGETS = ("img_projection",)  # both linears of the vision projector MLP
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # q/k/v_proj are also PhiMoE's attention
ALL_TARGETS = DECODER_TARGETS + PROJECTOR_TARGETS + CLIP_TARGETS
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped model in saved keys
BASES = (nn.Linear, WeightOnlyInt8Linear, WeightOnlyInt4Linear)


class LoRALinear(nn.Module):
    """A frozen linear (float or weight-only quantized) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if r < 1:
            raise InputError(f"LoRA rank {r} must be a positive integer")
        self.base_layer = base  # peft's name for it
        for p in base.parameters():
            p.requires_grad_(False)
        K, N = base.in_features, base.out_features
        ref = next(iter(base.state_dict().values()))
        # adapters train in float32 under bf16 weights; a float32 base keeps float32
        dtype = torch.float32 if not ref.is_floating_point() or ref.element_size() < 4 else ref.dtype
        self.lora_A = nn.Linear(K, r, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(r, N, bias=False, device=ref.device, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)
        if generator is not None:  # the same init on any device: drawn on the CPU from the generator
            with torch.no_grad():
                a = torch.empty(self.lora_A.weight.shape, dtype=dtype)
                self.lora_A.weight.copy_(nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.enabled = False, True

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  generator: torch.Generator | None = None) -> LoRALinear:
        if not isinstance(linear, BASES):
            raise InputError(f"LoRA wraps nn.Linear or a weight-only int8/int4 linear, not {type(linear).__name__}")
        return cls(linear, r, alpha, dropout, generator)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def quantized(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output; a quantized base is dequantized on the fly when gradients must flow through x
        (its int kernels have no backward)."""
        b = self.base_layer
        if not self.quantized or not (torch.is_grad_enabled() and x.requires_grad):
            return b(x)
        return F.linear(x, self.dequantized_weight(x.dtype), None if b.bias is None else b.bias.to(x.dtype))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) float weight of the base."""
        b = self.base_layer
        if isinstance(b, WeightOnlyInt8Linear):
            return b.weight.to(dtype) * b.scales.to(dtype)[:, None]
        if isinstance(b, WeightOnlyInt4Linear):
            return dequantize_int4(b.weight, b.scales_and_zeros, b.group_size).to(dtype)
        return b.weight.to(dtype)

    def delta(self) -> torch.Tensor:
        """(N, K) = scaling * B @ A: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged or not self.enabled:
            return y
        A = self.lora_A.weight
        return y + (self.lora_B(self.lora_A(self.dropout(x.to(A.dtype)))) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into a float base weight (a quantized base cannot take it exactly: left unmerged)."""
        if self.merged or self.quantized:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta().float()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    """A target names a module or one of its parents on dot boundaries: "o_proj", "img_projection",
    "self_attn", or a full name such as "model.layers.0.self_attn.qkv_proj"."""
    return f".{target}." in f".{name}."


def unused_vision_layers(model: nn.Module) -> list[str]:
    """Name prefixes of CLIP encoder layers after the one the image embedding reads (layer_idx): never run."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Phi3ImageEmbedding):
            layers = m.img_processor.vision_model.encoder.layers
            prefix = f"{name}.img_processor.vision_model.encoder.layers"
            out += [f"{prefix}.{i}." for i in range(m.cfg.num_layers_run, len(layers))]
    return out


def select_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linears to wrap: each matching one of `targets` (see _matches), or, when `targets` is a str,
    whose full name matches that regex (peft's convention). Unused CLIP layers and the lm_head are never chosen."""
    skip = unused_vision_layers(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, BASES) and n != "lm_head" and not any(f"{n}.".startswith(s) for s in skip)]
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
        if not chosen:
            raise InputError(f"LoRA target pattern {targets!r} matches no linear layer of the model")
        return chosen
    targets = list(targets)
    if not targets:
        raise InputError(f"give at least one LoRA target module, e.g. {', '.join(DECODER_TARGETS)}")
    for t in targets:
        if not any(_matches(n, t) for n in names):
            raise InputError(f"LoRA target {t!r} matches no linear layer of the model; choose from "
                             f"{', '.join(ALL_TARGETS)} (the CLIP and projector ones need a vision model)")
    return [n for n in names if any(_matches(n, t) for t in targets)]


def apply_lora(model: nn.Module, targets=DECODER_TARGETS, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, seed: int | None = None) -> list[str]:
    """Freeze every parameter of the model and wrap the target linears in LoRALinear (in place); return their
    names. Only the adapters' lora_A / lora_B are trainable afterwards. `seed` draws A reproducibly (default:
    torch's global RNG)."""
    if lora_layers(model):
        raise InputError("the model already has LoRA adapters; merge or load into a fresh model")
    names = select_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear.from_base(getattr(owner, child), r, alpha, dropout, g))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its float base weight (outputs unchanged, no adapter matmuls); return how many."""
    layers = lora_layers(model).values()
    for m in layers:
        m.merge()
    return sum(m.merged for m in layers)


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (merged first by default): a plain model with the checkpoint's names."""
    for name, m in lora_layers(model).items():
        if merge and m.quantized:
            raise InputError(f"{name} has a quantized base: merge the adapter into the float checkpoint instead")
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model inside the block (DPO's reference pass); merged adapters are unmerged meanwhile."""
    layers = list(lora_layers(model).values())
    state = [(m.enabled, m.merged) for m in layers]
    for m in layers:
        m.unmerge()
        m.enabled = False
    try:
        yield model
    finally:
        for m, (enabled, merged) in zip(layers, state):
            m.enabled = enabled
            if merged:
                m.merge()


# --------------------------------------------------------------------------- saving and loading (peft's layout)

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names: base_model.model.{module}.lora_A.weight / lora_B.weight."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """peft's LoraConfig for the model's adapters (one rank / alpha / dropout for all of them)."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in layers.values()):
        raise InputError("adapters of different rank or alpha cannot be saved as one peft LoraConfig")
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": first.r, "lora_alpha": first.alpha, "lora_dropout": p, "target_modules": sorted(layers),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}


def save_adapter(model: nn.Module, out_dir, base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (only the adapters) to out_dir."""
    out = Path(out_dir)
    cfg = adapter_config(model, base_model)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def read_adapter(adapter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, weights with peft's names) of an adapter folder, checked to be a plain LoRA."""
    d = Path(adapter_dir)
    cfg_path, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{d} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                              "(write one with `phi3v train sft --lora-r ...` or peft's save_pretrained)")
    cfg = read_json(cfg_path, ADAPTER_CONFIG)
    unsupported = {"peft_type": (cfg.get("peft_type"), "LORA"), "use_dora": (cfg.get("use_dora") or False, False),
                   "use_rslora": (cfg.get("use_rslora") or False, False), "bias": (cfg.get("bias", "none"), "none"),
                   "fan_in_fan_out": (cfg.get("fan_in_fan_out") or False, False)}
    for key, (got, want) in unsupported.items():
        if got != want:
            raise CheckpointError(f"{cfg_path}: {key} is {got!r}; only plain LoRA ({key} = {want!r}) is supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise CheckpointError(f"{cfg_path}: rank_pattern, alpha_pattern and modules_to_save are not supported")
    st = SafetensorsFile(weights)
    return cfg, {k: st.get(k) for k in st.keys()}


def load_adapter(model: nn.Module, adapter_dir, merge: bool = False) -> list[str]:
    """Wrap the adapter's target modules of `model` and load its weights strictly; with merge, fold them into the
    float weights (quantized layers stay unmerged). Returns the wrapped module names."""
    cfg, state = read_adapter(adapter_dir)
    targets = cfg.get("target_modules")
    if not targets:
        raise CheckpointError(f"{adapter_dir}/{ADAPTER_CONFIG} has no target_modules")
    skip = unused_vision_layers(model)
    if not isinstance(targets, str):
        targets = [t for t in targets if not any(f"{t}.".startswith(s) for s in skip)]
    try:
        names = apply_lora(model, targets, int(cfg["r"]), float(cfg.get("lora_alpha", 8)), 0.0)
    except InputError as e:
        raise CheckpointError(f"adapter {adapter_dir} does not fit this model: {e}") from e
    # peft saves names without the adapter name ("default"); files saved from memory may still carry it
    state = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in state.items()}
    # adapters on CLIP layers the model never runs (peft wraps them too) change nothing: dropped
    unused = [PEFT_PREFIX + s for s in unused_vision_layers(model)]
    state = {k: v for k, v in state.items() if not any(k.startswith(u) for u in unused)}
    expected = {k: v for k, v in adapter_state_dict(model).items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        remove_lora(model, merge=False)
        raise CheckpointError(f"adapter {adapter_dir} does not match the model: {len(missing)} missing "
                              f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}) weights")
    with torch.no_grad():
        for k, t in expected.items():
            if tuple(state[k].shape) != tuple(t.shape):
                remove_lora(model, merge=False)
                raise CheckpointError(f"adapter weight {k} has shape {tuple(state[k].shape)}, the model needs "
                                      f"{tuple(t.shape)}: the adapter was trained on another model size")
            t.copy_(state[k].to(t.dtype))
    if merge:
        merge_lora(model)
    return names
