"""Prompts, steps and one-off batched generation (a thin layer over the continuous-batching Engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import ContextLengthError, InputError
from .model import CausalLM
from .sampling import SamplingParams


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


def generate_steps(model: CausalLM, prompts: list[Prompt], params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
                   max_context: int | None = None, recompute_on_long_switch: bool = True,
                   engine=None) -> Iterator[list[Step]]:
    """Generate for a batch of prompts; yield, after each engine step, the new tokens (Step.row = prompt index).

    Runs on `engine` when given (its cache may already hold a prefix), else on a one-off Engine sized for
    exactly this batch. When a row grows past LongRoPE's
    original_max_position_embeddings, its cache (built with the short factors) is recomputed once with the
    long factors, as the reference does (Phi-3-vision's reference does not: recompute_on_long_switch=False).
    """
    from .engine import Engine

    if not prompts:
        return
    lens = [len(p.ids) for p in prompts]
    if min(lens) == 0:
        raise InputError("empty prompt: give at least one token")
    limit = check_prompt_fits(max(lens), model.config, max_context)
    budget = [min(params.max_new_tokens, limit - n) for n in lens]
    if max(budget) == 0:  # max_new_tokens=0: nothing to generate, so no prefill either
        return
    if engine is None:
        size = max(n + b for n, b in zip(lens, budget))
        engine = Engine(model, max_batch=len(prompts), max_context=size, prefill_chunk=size,
                        recompute_on_long_switch=recompute_on_long_switch)
    rows = {engine.add(p, params, stop_ids): i for i, p in enumerate(prompts)}
    while any(engine.is_active(r) for r in rows):
        group: list[Step] = []  # each yield holds at most one token per row, in order
        for s in engine.step():
            if s.token < 0:
                continue
            if any(g.row == rows[s.row] for g in group):
                yield group
                group = []
            group.append(Step(rows[s.row], s.token, s.finish_reason))
        if group:
            yield group
