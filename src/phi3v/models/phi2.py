"""Phi-2 (PhiForCausalLM, model_type "phi"): one LayerNorm feeding attention and MLP in parallel
(x + attn(ln x) + mlp(ln x)), partial rotary (RoPE on the first partial_rotary_factor of each head, rotate-half),
gelu_new, biases everywhere including lm_head. Notation: see layers.py.

Queries and keys go to the attention scores in float32: Phi-2's q.k products overflow float16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .cache import KVCache
from .layers import Attention, CausalLM
from .rope import RotaryEmbedding, apply_rotary


@dataclass
class Phi2Config:
    """Phi-2's config.json keys (microsoft/phi-2's defaults)."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.4
    qk_layernorm: bool = False
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 50256
    eos_token_id: int | list[int] = 50256
    pad_token_id: int | None = None
    model_type: str = "phi"
    architectures: list[str] = field(default_factory=lambda: ["PhiForCausalLM"])

    # what the shared decoder code asks of every config: Phi-2 has no sliding window and no LongRoPE
    sliding_window = None
    rope = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi2Config:
        d = dict(d)
        rp = d.get("rope_parameters")  # transformers 5 moves rope_theta and partial_rotary_factor here
        if isinstance(rp, dict):
            for key in ("rope_theta", "partial_rotary_factor"):
                if key not in d and key in rp:
                    d[key] = rp[key]
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.rope_scaling:
            raise CheckpointError(f"rope scaling {cfg.rope_scaling!r} is not supported for Phi-2; phi3v runs the "
                                  "published Phi-2 (plain RoPE)")
        if cfg.hidden_act != "gelu_new":
            raise CheckpointError(f"unsupported hidden_act {cfg.hidden_act!r}; Phi-2 uses 'gelu_new'")
        return cfg

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                f"num_key_value_heads {self.num_key_value_heads} do not divide evenly")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise CheckpointError(f"partial_rotary_factor {self.partial_rotary_factor} of head dim {self.head_dim} "
                                  "gives an odd or empty rotary part; fix config.json")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)  # Phi-2: 32 of 80

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PartialRotaryEmbedding(RotaryEmbedding):
    """Default RoPE over the first rotary_dim dims of a head: (cos, sin) of shape (B, T, rotary_dim)."""

    def __init__(self, cfg: Phi2Config):
        nn.Module.__init__(self)
        d = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", torch.stack([inv_freq, inv_freq]), persistent=False)  # (2, d/2)
        self.register_buffer("mscale", torch.ones(2), persistent=False)
        self.original_max = None


class Phi2Attention(Attention):
    def __init__(self, cfg: Phi2Config):
        super().__init__(cfg)
        self.rotary_dim = cfg.rotary_dim
        if cfg.qk_layernorm:  # phi-1.5 variants; Phi-2 has none
            self.q_layernorm = nn.LayerNorm(self.hd, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.hd, eps=cfg.layer_norm_eps)
        self.qk_layernorm = cfg.qk_layernorm

    def make_projections(self, cfg: Phi2Config):
        q, kv = self.nh * self.hd, self.nkv * self.hd
        self.q_proj = nn.Linear(cfg.hidden_size, q)
        self.k_proj = nn.Linear(cfg.hidden_size, kv)
        self.v_proj = nn.Linear(cfg.hidden_size, kv)
        self.dense = nn.Linear(q, cfg.hidden_size)

    def _rotate(self, x, cos, sin):
        r = self.rotary_dim
        return torch.cat((apply_rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)

    def forward(self, x, cos, sin, mask, pos, cache: KVCache | None, layer: int, kv_len: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v, kv_len)  # (B, nkv, S, hd)
        # scores (and so the softmax and the weighted sum) in float32, the result back in the model's dtype
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           enable_gqa=self.nkv != self.nh).to(v.dtype)
        return self.dense(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Phi2MLP(nn.Module):
    def __init__(self, cfg: Phi2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_new


class Phi2Block(nn.Module):
    """Attention and MLP read the same LayerNorm output and are added to the residual together."""

    def __init__(self, cfg: Phi2Config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Phi2Attention(cfg)
        self.mlp = Phi2MLP(cfg)

    def forward(self, x, cos, sin, mask, pos, cache, layer, kv_len):
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, mask, pos, cache, layer, kv_len) + self.mlp(h)


class Phi2Decoder(nn.Module):
    """`model.*` of a Phi-2 checkpoint; its final norm is `final_layernorm` (exposed as `norm` to shared code)."""

    def __init__(self, cfg: Phi2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Phi2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def norm(self) -> nn.Module:
        return self.final_layernorm


class PhiForCausalLM(CausalLM):
    block = Phi2Block

    def __init__(self, cfg: Phi2Config):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = Phi2Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.rotary = PartialRotaryEmbedding(cfg)
