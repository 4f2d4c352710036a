"""The training forward pass: a batched image embedding and the decoder without a materialised (B, 1, T, T) mask.

Rows are right padded, so a causal mask alone is exact for every real token (padding comes after them): SDPA gets
torch's `causal_upper_left` bias, which dispatches to its is_causal kernels. Only a sliding window shorter than the
batch needs the explicit mask. LongRoPE picks short or long factors per row from the row's real length, so a row
gives the same logits in a batch as alone.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_upper_left
from torch.utils.checkpoint import checkpoint

from phi3v.data.collate import Batch


def embed_batch(model, batch: Batch) -> torch.Tensor:
    """(B, T) ids -> (B, T, C): token embeddings, image placeholders replaced by their feature rows. The vision tower
    runs once on the real crops of every image in the batch (never on padding crops)."""
    ids = batch.input_ids
    x = model.model.embed_tokens(ids.clamp_min(0))  # (B, T, C)
    if batch.pixel_values is None:
        return x
    feats = model.model.vision_embed_tokens(batch.pixel_values, batch.image_sizes)  # per image (rows, C)
    rows = torch.cat(feats)[batch.image_rows]  # (P, C) in the row-major order of the placeholders
    where = (ids < 0)[..., None]  # (B, T, 1)
    return x.masked_scatter(where, rows.to(x.dtype))


def hidden_states(model, batch: Batch, checkpointing: bool = False) -> torch.Tensor:
    """Final-norm hidden states (B, T, C) of a right-padded batch; `checkpointing` recomputes each decoder layer
    in backward. The LM head is left to the caller, which may need it at a few positions only."""
    x = embed_batch(model, batch)
    B, T, _ = x.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    rotary = model.rotary
    long = None if rotary.original_max is None else batch.lengths > rotary.original_max
    cos, sin = rotary(pos, long, dtype=x.dtype)
    window = model.config.sliding_window
    mask = causal_upper_left(T, T) if window is None or T <= window else model.attention_mask(pos, pos)
    for i, layer in enumerate(model.model.layers):
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, mask, pos, None, i, T, use_reentrant=False)
        else:
            x = layer(x, cos, sin, mask, pos, None, i, T)
    return model.model.norm(x)


def forward(model, batch: Batch, checkpointing: bool = False, return_hidden: bool = False):
    """Logits (B, T, V) of a right-padded batch (and the hidden states with return_hidden)."""
    h = hidden_states(model, batch, checkpointing)
    logits = model.lm_head(h)
    return (logits, h) if return_hidden else logits
