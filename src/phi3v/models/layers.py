"""Layers shared by the decoders (Phi-3, Phi-3.5-MoE) and the causal-LM base class they build on.
Module names equal the checkpoints' so safetensors load without renaming.

Notation (used in shape comments throughout phi3v.models): B batch, T new tokens, S attended keys (cache length),
C hidden size, nh query heads, nkv key/value heads, hd head dim, E experts, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_upper_left

from .cache import KVCache
from .config import Phi3Config
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    # fused(x, weight, eps) -> y or None: the same steps in one call for decode sizes, installed from outside the
    # model (phi3v.inference.kernels); None where it does not apply
    fused = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            y = self.fused(x, self.weight, self.eps)
            if y is not None:
                return y
        # computed in float32 as the reference does, then cast back before the weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Fused qkv projection (Phi-3). PhiMoE overrides `qkv()` for its separate q/k/v projections."""

    # decode_kernel(q, k, v, mask) -> y or None: a faster attention for one new token per row, installed from
    # outside the model (phi3v.inference.kernels); None where it does not apply, then SDPA runs
    decode_kernel = None
    # rotary(x, cos, sin) -> apply_rotary(x, cos, sin) in one call for decode sizes, or None (installed the same way)
    rotary = None

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.make_projections(cfg)

    def make_projections(self, cfg: Phi3Config):
        q, kv = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """apply_rotary, through the installed `rotary` where it applies (each tensor decides for itself)."""
        y = self.rotary(x, cos, sin) if self.rotary is not None else None
        return apply_rotary(x, cos, sin) if y is None else y

    def qkv(self, x: torch.Tensor):
        q, kv = self.nh * self.hd, self.nkv * self.hd
        return self.qkv_proj(x).split([q, kv, kv], dim=-1)

    def forward(self, x, cos, sin, mask, pos, cache: KVCache | None, layer: int, kv_len: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v, kv_len)  # (B, nkv, S, hd)
        y = self.decode_kernel(q, k, v, mask) if T == 1 and self.decode_kernel is not None else None
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


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


class DecoderModel(nn.Module):
    """`model.*` of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: Phi3Config, block: type[Block], norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = norm


class CausalLM(nn.Module):
    """A decoder-only LM: `model.*` (embeddings, blocks, final norm), `lm_head` and the rotary embedding.
    Each family subclasses it with its block and norm. forward() is pure: all state lives in the cache passed in."""

    block: type[nn.Module] = Block

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, type(self).block, self.make_norm(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=self.lm_head_bias(cfg))
        self.rotary = RotaryEmbedding(cfg)

    @classmethod
    def from_config(cls, cfg: Phi3Config, raw: dict | None = None) -> CausalLM:
        """The model for a parsed config (`raw`: the whole config.json, for families with more parts)."""
        return cls(cfg)

    @staticmethod
    def make_norm(cfg: Phi3Config) -> nn.Module:
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @staticmethod
    def lm_head_bias(cfg: Phi3Config) -> bool:
        return False

    def attention_mask(self, pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) bool: causal, within the sliding window when the config sets one."""
        q = pos[:, None, :, None]
        k = key_pos[:, None, None, :]
        allowed = k <= q
        if self.config.sliding_window is not None:
            allowed &= k > q - self.config.sliding_window
        return allowed

    def plain_causal(self, pos: torch.Tensor) -> bool:
        """Whether attention_mask(pos, keys 0..S-1) is the plain causal mask of T queries: every row's positions are
        0..T-1 (a prompt from its start), all within the sliding window. SDPA then gets torch's causal_upper_left,
        whose kernels skip the keys after each block of queries instead of reading a (B, 1, T, S) mask; the results
        are the same bits on CPU (float32 and bf16, T 37-773; 773 tokens, 32 heads: 1.37x the speed on Zen 3).
        Decode (T = 1) keeps the mask, which the decode kernels read."""
        T = pos.shape[-1]
        window = self.config.sliding_window
        if T == 1 or (window is not None and T > window):
            return False
        return bool((pos == torch.arange(T, device=pos.device)).all())

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
        mask = causal_upper_left(T, kv_len) if self.plain_causal(pos) else self.attention_mask(pos, key_pos)
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
        """Checkpoint tensors -> this module's state dict (families with irregular layouts override it)."""
        return state
