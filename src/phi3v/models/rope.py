"""Rotary position embeddings: default RoPE and LongRoPE (Phi-3 'su' / 'longrope') with the short/long switch.

LongRoPE keeps two sets of per-frequency factors. A sequence whose length is at most
`original_max_position_embeddings` uses the short factors, a longer one the long factors, for *every* position
(the reference decides per forward pass from max(position_ids) + 1). The choice is made per row here, on device,
so a batch needs no host sync; re-computing a cache that was built with the short factors when a sequence
grows past the boundary is the generator's job.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Phi3Config


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape (B, T, hd) for positions (B, T) and a per-row long/short choice."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        hd, base = cfg.head_dim, cfg.rope_theta
        # Same float32 arithmetic as the reference, so cos/sin agree to the last bit.
        exponent = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
        if cfg.rope is None:
            short = long = 1.0 / (base**exponent)
            mscale = (1.0, 1.0)
            self.original_max = None
        else:
            short = 1.0 / (torch.tensor(cfg.rope.short_factor, dtype=torch.float32) * base**exponent)
            long = 1.0 / (torch.tensor(cfg.rope.long_factor, dtype=torch.float32) * base**exponent)
            mscale = (cfg.rope.short_mscale, cfg.rope.long_mscale)
            self.original_max = cfg.rope.original_max_position_embeddings
        self.register_buffer("inv_freq", torch.stack([short, long]), persistent=False)  # (2, hd/2)
        self.register_buffer("mscale", torch.tensor(mscale, dtype=torch.float32), persistent=False)  # (2,)

    def needs_long(self, seq_len: int) -> bool:
        """Whether a sequence of `seq_len` tokens uses the long factors (host-side rule for the generator)."""
        return self.original_max is not None and seq_len > self.original_max

    def forward(self, pos: torch.Tensor, long: torch.Tensor | None = None, dtype=torch.float32):
        # pos: (B, T) int64; long: (B,) bool, default: row length max(pos) + 1 past the boundary
        if long is None:
            if self.original_max is None:
                long = torch.zeros(pos.shape[0], dtype=torch.bool, device=pos.device)
            else:
                long = pos.amax(dim=1) + 1 > self.original_max
        idx = long.long()
        inv_freq = self.inv_freq[idx]  # (B, hd/2)
        freqs = pos[..., None].float() * inv_freq[:, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        scale = self.mscale[idx][:, None, None]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos, sin: (B, T, hd)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
