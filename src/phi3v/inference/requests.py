"""What goes into the engine and comes out of it: prompts (ids, optional embeddings) and steps (one token per row)."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..errors import ContextLengthError, InputError
from ..models.layers import CausalLM


@dataclass
class Step:
    """One token for one row; finish_reason is set on the row's last step ('stop' or 'length')."""

    row: int
    token: int
    finish_reason: str | None = None
    logprob: float | None = None  # log-probability of token, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely alternatives, best first


@dataclass
class Prompt:
    """Token ids, and optionally input embeddings (images spliced in) of the same length."""

    ids: list[int]
    embeds: torch.Tensor | None = None  # (T, C)
    key: list | None = None  # identifies the tokens for KV reuse (image placeholders paired with the image digest)


def embed_ids(model: CausalLM, prompt: Prompt, seq: list[int], start: int, end: int, device) -> torch.Tensor:
    """(end - start, C) embeddings of seq[start:end]; seq starts with the prompt, whose embeddings (images
    spliced in) come from prompt.embeds when it has them."""
    n = len(prompt.ids) if prompt.embeds is not None else 0
    parts = []
    if start < n:
        parts.append(prompt.embeds[start:min(end, n)])
    if end > max(start, n):
        ids = torch.tensor(seq[max(start, n):end], dtype=torch.long, device=device)
        parts.append(model.model.embed_tokens(ids))
    dtype = parts[-1].dtype if prompt.embeds is None else model.model.embed_tokens.weight.dtype
    return torch.cat([p.to(device=device, dtype=dtype) for p in parts])


def check_prompt_fits(n_tokens: int, cfg, max_context: int | None = None) -> int:
    """Raise ContextLengthError unless a prompt of n_tokens leaves room for one new token; return the limit."""
    if max_context is not None and max_context < 1:
        raise InputError(f"max_context must be a positive number of tokens, not {max_context}")
    limit = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if n_tokens >= limit:
        raise ContextLengthError(
            f"prompt of {n_tokens} tokens does not fit the context of {limit} tokens (it needs room for at least "
            "one new token); shorten the prompt or raise max_context"
        )
    return limit
