"""Model families over shared layers, and the one registry from a config.json's architecture to (config, model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .config import Phi3Config, PhiMoEConfig, read_json
from .layers import CausalLM
from .mixtral import MixtralConfig, MixtralForCausalLM
from .phi2 import Phi2Config, PhiForCausalLM
from .phi3 import Phi3ForCausalLM
from .phi3_v import Phi3VForCausalLM, is_vision_config
from .phimoe import PhiMoEForCausalLM

# config.json "architectures" -> (config class, model class). Microsoft writes PhiMoE, transformers writes Phimoe.
# Phi3VForCausalLM's config class is its decoder's: the image embedding reads its own keys from the raw dict.
ARCHITECTURES: dict[str, tuple[type[Phi3Config], type[CausalLM]]] = {
    "Phi3ForCausalLM": (Phi3Config, Phi3ForCausalLM),
    "PhiMoEForCausalLM": (PhiMoEConfig, PhiMoEForCausalLM),
    "PhimoeForCausalLM": (PhiMoEConfig, PhiMoEForCausalLM),
    "Phi3VForCausalLM": (Phi3Config, Phi3VForCausalLM),
    "PhiForCausalLM": (Phi2Config, PhiForCausalLM),
    "MixtralForCausalLM": (MixtralConfig, MixtralForCausalLM),
}

__all__ = ["ARCHITECTURES", "CausalLM", "architecture", "build_model", "config_from_dict", "is_vision_config",
           "load_config"]


def architecture(d: dict[str, Any]) -> tuple[type[Phi3Config], type[CausalLM]]:
    """(config class, model class) of a config.json dict; an unknown architecture is an error."""
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise CheckpointError(
        f"unsupported architecture {archs!r} in config.json; phi3v supports {sorted(ARCHITECTURES)}"
    )


def config_from_dict(d: dict[str, Any]) -> Phi3Config:
    """Pick the config class from `architectures` and build it."""
    return architecture(d)[0].from_dict(d)


def load_config(model_dir: str | Path) -> Phi3Config:
    return config_from_dict(read_json(Path(model_dir) / "config.json", "config.json"))


def build_model(cfg: Phi3Config, raw: dict | None = None) -> CausalLM:
    """The model for a config (on the current default device). `raw`, the config.json dict, holds the parts beyond
    the decoder (Phi-3-vision's tower); without it the config's own `architectures` pick the class."""
    return architecture(raw if raw is not None else {"architectures": cfg.architectures})[1].from_config(cfg, raw)
