"""Phi-3 and Phi-3.5-MoE decoders. Module names equal the checkpoints' so safetensors load without renaming.

Notation: B batch, T new tokens, S attended keys (cache length), C hidden size, nh query heads,
nkv key/value heads, hd head dim, E experts, V vocabulary.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Phi3Config, PhiMoEConfig
from .errors import CheckpointError
from .rope import RotaryEmbedding, apply_rotary


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 as the reference does, then cast back before the weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Fused qkv projection (Phi-3). PhiMoE overrides `qkv()` for its separate q/k/v projections."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.make_projections(cfg)

    def make_projections(self, cfg: Phi3Config):
        q, kv = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor):
        q, kv = self.nh * self.hd, self.nkv * self.hd
        return self.qkv_proj(x).split([q, kv, kv], dim=-1)

    def forward(self, x, cos, sin, mask, pos, cache: KVCache | None, layer: int, kv_len: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v, kv_len)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MoEAttention(Attention):
    def make_projections(self, cfg: PhiMoEConfig):
        q, kv, bias = self.nh * self.hd, self.nkv * self.hd, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=bias)

    def qkv(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


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

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        weights, experts = sparsemixer_top2(self.gate(x), self.jitter_eps)
        return self.experts(x, weights, experts).view(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def ffn(self, x):
        return self.mlp(x)

    def forward(self, x, cos, sin, mask, pos, cache, layer, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, pos, cache, layer, kv_len)
        return x + self.ffn(self.post_attention_layernorm(x))


class MoEBlock(Block):
    def __init__(self, cfg: PhiMoEConfig):
        nn.Module.__init__(self)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MoEAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(cfg)

    def ffn(self, x):
        return self.block_sparse_moe(x)


class DecoderModel(nn.Module):
    """`model.*` of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: Phi3Config, block: type[Block], norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = norm


class CausalLM(nn.Module):
    """Phi3ForCausalLM / PhiMoEForCausalLM. forward() is pure: all state lives in the cache passed in."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        moe = isinstance(cfg, PhiMoEConfig)
        norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if moe else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.model = DecoderModel(cfg, MoEBlock if moe else Block, norm)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=moe and cfg.lm_head_bias)
        self.rotary = RotaryEmbedding(cfg)

    def attention_mask(self, pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) bool: causal, within the sliding window when the config sets one."""
        q = pos[:, None, :, None]
        k = key_pos[:, None, None, :]
        allowed = k <= q
        if self.config.sliding_window is not None:
            allowed &= k > q - self.config.sliding_window
        return allowed

    def forward(self, input_ids=None, *, pos=None, cache: KVCache | None = None, kv_len: int | None = None,
                inputs_embeds=None, long_rope=None, logits_at=None, return_hidden: bool = False):
        """Logits (B, T, V) for tokens at positions pos (B, T).

        Without a cache the tokens attend to each other only (right padding is harmless: it comes later).
        With a cache, k/v are written at pos and the first kv_len cached entries are attended to.
        long_rope (B,) picks LongRoPE's long factors per row; default: max(pos) + 1 > original max.
        logits_at (B,) computes the logits of one position per row only (B, 1, V).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if pos is None:
            pos = torch.arange(T, device=x.device).expand(B, T)
        if cache is None:
            key_pos, kv_len = pos, T
        else:
            kv_len = kv_len if kv_len is not None else cache.max_len
            key_pos = torch.arange(kv_len, device=x.device).expand(B, kv_len)
        mask = self.attention_mask(pos, key_pos)
        cos, sin = self.rotary(pos, long_rope, dtype=x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, pos, cache, i, kv_len)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        h = self.model.norm(x)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    # ---- weights ----
    @staticmethod
    def sanitize(cfg: Phi3Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stack PhiMoE's per-expert weights (experts.{e}.w1.weight -> experts.w1 (E, I, C))."""
        if not isinstance(cfg, PhiMoEConfig):
            return state
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
