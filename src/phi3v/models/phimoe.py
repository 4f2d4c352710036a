"""Phi-3.5-MoE (PhiMoEForCausalLM): 16 SwiGLU experts with the sparsemixer top-2 router, LayerNorm, biases in
attention and lm_head. Notation: see layers.py."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .config import PhiMoEConfig
from .layers import Attention, Block, CausalLM

_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


class MoEAttention(Attention):
    def make_projections(self, cfg: PhiMoEConfig):
        q, kv, bias = self.nh * self.hd, self.nkv * self.hd, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=bias)

    def qkv(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def sparsemixer_top2(scores: torch.Tensor, jitter_eps: float):
    """Phi-3.5-MoE's router at inference: (N, E) logits -> weights (N, 2), experts (N, 2).

    Not a softmax over the top-2: each pick is a softmax over the experts whose logit is within a
    relative 2*jitter_eps of that pick's maximum, the second pick excluding the first expert.
    """
    def pick(masked_scores):
        top, idx = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        outside = ((top - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked_scores.masked_fill(outside, float("-inf")), dim=-1)
        return gates.gather(-1, idx), idx

    w1, e1 = pick(scores)
    w2, e2 = pick(scores.scatter(-1, e1, float("-inf")))
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1 (gate) and w3 (up) (E, I, C), w2 (down) (E, C, I)."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        E, C, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, I, C))
        self.w2 = nn.Parameter(torch.empty(E, C, I))
        self.w3 = nn.Parameter(torch.empty(E, I, C))

    def _linear(self, h: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return F.linear(h, getattr(self, name)[e])

    def forward(self, x, weights, experts):
        # x: (N, C); weights, experts: (N, k); tokens are grouped by expert, one matmul per expert used
        out = torch.zeros_like(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        token = order // experts.shape[1]
        w = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t = token[start:start + n]
            h = x[t]
            h = self._linear(F.silu(self._linear(h, "w1", e)) * self._linear(h, "w3", e), "w2", e)
            out.index_add_(0, t, (h * w[start:start + n, None]).to(out.dtype))
            start += n
        return out


class SparseMoE(nn.Module):
    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg)
        self.jitter_eps = cfg.router_jitter_noise

    def route(self, logits: torch.Tensor):
        """(N, E) router logits -> weights (N, k), experts (N, k)."""
        return sparsemixer_top2(logits, self.jitter_eps)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        weights, experts = self.route(self.gate(x))
        return self.experts(x, weights, experts).view(B, T, C)


class MoEBlock(Block):
    def __init__(self, cfg: PhiMoEConfig):
        nn.Module.__init__(self)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MoEAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(cfg)

    def ffn(self, x):
        return self.block_sparse_moe(x)


class PhiMoEForCausalLM(CausalLM):
    block = MoEBlock

    @staticmethod
    def make_norm(cfg: PhiMoEConfig) -> nn.Module:
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    @staticmethod
    def lm_head_bias(cfg: PhiMoEConfig) -> bool:
        return cfg.lm_head_bias

    @staticmethod
    def sanitize(cfg: PhiMoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stack the per-expert weights (experts.{e}.w1.weight -> experts.w1 (E, I, C))."""
        out = {k: v for k, v in state.items() if not _PER_EXPERT.search(k)}
        for name in list(state):
            if ".experts.0.w" in name:
                head, tail = name.split(".experts.0.")
                w = tail.split(".")[0]
                keys = [f"{head}.experts.{e}.{w}.weight" for e in range(cfg.num_local_experts)]
                missing = [k for k in keys if k not in state]
                if missing:
                    raise CheckpointError(f"checkpoint is missing expert weights, e.g. {missing[0]}")
                out[f"{head}.experts.{w}"] = torch.stack([state[k] for k in keys])
        return out
