"""Static, preallocated KV cache written by index: shapes never change between decode steps."""

from __future__ import annotations

import torch

from ..errors import ContextLengthError


class KVCache:
    """Keys and values of every layer for `batch` rows of up to `max_len` tokens.

    Row b's token at position p lives at index p. Writes scatter by position, so rows of different lengths
    share one tensor and a row is reset by simply writing from position 0 again.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype=torch.float32, device=None) -> KVCache:
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, device)

    @staticmethod
    def nbytes_for(cfg, batch: int, max_len: int, dtype=torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * max_len * cfg.head_dim * elem

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop): writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        return view

    def check_fits(self, length: int) -> None:
        if length > self.max_len:
            raise ContextLengthError(
                f"sequence of {length} tokens does not fit the KV cache of {self.max_len} tokens; "
                "raise max_context or shorten the prompt / max_new_tokens"
            )

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (B, nkv, T, hd) at positions pos (B, T); return the first kv_len cached entries."""
        # index_copy_ per row: scatter_ / index_put_ over the cache cost milliseconds on CPU, this microseconds
        for b in range(pos.shape[0]):
            self.k[layer, b].index_copy_(1, pos[b], k[b])
            self.v[layer, b].index_copy_(1, pos[b], v[b])
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
