"""Mixtral (MixtralForCausalLM): RMSNorm, GQA, an optional sliding window, E SwiGLU experts (w1 gate, w3 up,
w2 down) behind a softmax top-2 router. Notation: see layers.py.

It shares Phi-3.5-MoE's stacked experts and their checkpoint layout by subclassing PhiMoEForCausalLM, so the expert
stacking at load, the per-expert export, int8 expert quantization and the router's aux loss apply unchanged; only
the router, the norms and the biases differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError
from .config import Phi3Config
from .layers import RMSNorm
from .phimoe import Experts, MoEAttention, MoEBlock, PhiMoEForCausalLM, SparseMoE


@dataclass
class MixtralConfig(Phi3Config):
    """Mixtral 8x7B's config.json keys (the Phi3Config fields it shares, plus the experts')."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.0  # training-time input jitter of the reference: off at inference
    router_aux_loss_coef: float = 0.02
    attention_bias: bool = False  # MoEAttention reads it; Mixtral has no biases
    model_type: str = "mixtral"
    architectures: list[str] = field(default_factory=lambda: ["MixtralForCausalLM"])

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise CheckpointError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in 1..num_local_experts "
                                  f"({self.num_local_experts}); fix config.json")


def softmax_topk(logits: torch.Tensor, k: int):
    """Mixtral's router: (N, E) logits -> weights (N, k) float32, experts (N, k): a softmax over all experts in
    float32, the top k kept and renormalised to sum to 1."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), idx


class MixtralMoE(SparseMoE):
    def __init__(self, cfg: MixtralConfig):
        nn.Module.__init__(self)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg)
        self.k = cfg.num_experts_per_tok

    def route(self, logits: torch.Tensor):
        return softmax_topk(logits, self.k)


class MixtralBlock(MoEBlock):
    def __init__(self, cfg: MixtralConfig):
        nn.Module.__init__(self)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MoEAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = MixtralMoE(cfg)


class MixtralForCausalLM(PhiMoEForCausalLM):
    block = MixtralBlock

    @staticmethod
    def make_norm(cfg: MixtralConfig) -> nn.Module:
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @staticmethod
    def lm_head_bias(cfg: MixtralConfig) -> bool:
        return False
