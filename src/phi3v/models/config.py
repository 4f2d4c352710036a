"""Model configs: dataclasses whose fields are exactly the keys of a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# rope_scaling "type" values and what they mean here. Phi-3 (2024) wrote "su", later releases "longrope".
LONGROPE_TYPES = ("su", "longrope")


@dataclass
class RopeScaling:
    """LongRoPE parameters: per-frequency factors for short and long contexts and the cos/sin scale of each."""

    short_factor: list[float]
    long_factor: list[float]
    original_max_position_embeddings: int
    short_mscale: float
    long_mscale: float

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> RopeScaling | None:
        """Parse `rope_scaling` (Microsoft / transformers 4 style) or `rope_parameters` (transformers 5 style)."""
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type"))
        if kind == "default":
            return None
        if kind not in LONGROPE_TYPES:
            raise CheckpointError(
                f"unsupported rope scaling type {kind!r} in config.json; phi3v supports {LONGROPE_TYPES} or none"
            )
        # transformers reads it from rope_scaling first (Phi-3.5-MoE's config has it in both places)
        orig = rs.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        if orig is None:
            raise CheckpointError("config.json uses LongRoPE but has no original_max_position_embeddings")
        scale = d["max_position_embeddings"] / orig
        # The attention factor of the LongRoPE paper, unless the config states one (PhiMoE's short/long_mscale).
        default = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        default = rs.get("attention_factor") or default
        return cls(
            short_factor=list(rs["short_factor"]),
            long_factor=list(rs["long_factor"]),
            original_max_position_embeddings=int(orig),
            short_mscale=float(rs.get("short_mscale") or default),
            long_mscale=float(rs.get("long_mscale") or default),
        )


def _filter(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Phi3Config:
    """Phi-3 / Phi-3.5-mini / Phi-3-medium decoder (and the decoder of Phi-3(.5)-vision)."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 32000
    pad_token_id: int | None = 32000
    model_type: str = "phi3"
    architectures: list[str] = field(default_factory=lambda: ["Phi3ForCausalLM"])
    rope: RopeScaling | None = field(default=None, repr=False)  # parsed rope_scaling, not a config.json key

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3Config:
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        cfg = cls(**_filter(cls, d))
        cfg.rope = RopeScaling.from_config(d)
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"unsupported hidden_act {cfg.hidden_act!r}; Phi-3 decoders use 'silu'")
        return cfg

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                f"num_key_value_heads {self.num_key_value_heads} do not divide evenly"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "rope"}


@dataclass
class PhiMoEConfig(Phi3Config):
    """Phi-3.5-MoE: 16 experts, top-2 sparsemixer routing, LayerNorm, biases in attention and lm_head."""

    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.01
    attention_bias: bool = True
    lm_head_bias: bool = True
    model_type: str = "phimoe"
    architectures: list[str] = field(default_factory=lambda: ["PhiMoEForCausalLM"])

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts_per_tok != 2:
            raise CheckpointError(
                f"num_experts_per_tok={self.num_experts_per_tok}: the sparsemixer router of Phi-3.5-MoE is top-2 only"
            )


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON file of a checkpoint, turning a missing or corrupt file into a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e}); re-download or re-create it") from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{what} {path} holds a {type(obj).__name__}, not a JSON object: re-download or re-create it")
    return obj
