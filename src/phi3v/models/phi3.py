"""Phi-3 / Phi-3.5-mini (Phi3ForCausalLM): fused qkv and gate_up projections, RMSNorm, LongRoPE."""

from __future__ import annotations

from .layers import Block, CausalLM


class Phi3ForCausalLM(CausalLM):
    block = Block
