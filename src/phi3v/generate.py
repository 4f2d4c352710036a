"""Batched generation with a static KV cache, the LongRoPE cache recompute, stop tokens and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import KVCache
from .errors import ContextLengthError, InputError
from .model import CausalLM
from .sampling import SamplingParams, apply_repetition_penalty, make_sampler


@dataclass
class Step:
    """One token for one row; finish_reason is set on the row's last step ('stop' or 'length')."""

    row: int
    token: int
    finish_reason: str | None = None


@dataclass
class Prompt:
    """Token ids, and optionally input embeddings (images spliced in) of the same length."""

    ids: list[int]
    embeds: torch.Tensor | None = None  # (T, C)
    embed_fn: Callable[[list[int]], torch.Tensor] | None = field(default=None, repr=False)


def _embed(model: CausalLM, prompt: Prompt, ids: list[int], device) -> torch.Tensor:
    """Embeddings of ids, whose first len(prompt.ids) tokens are the prompt (with its images)."""
    if prompt.embeds is None:
        return model.model.embed_tokens(torch.tensor(ids, device=device))
    rest = model.model.embed_tokens(torch.tensor(ids[len(prompt.ids):], dtype=torch.long, device=device))
    return torch.cat([prompt.embeds.to(rest.dtype), rest])


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
                   max_context: int | None = None, recompute_on_long_switch: bool = True) -> Iterator[list[Step]]:
    """Yield, after each decode step, the new token of every row still running.

    Rows are right-padded and keep their own positions, so prompts of different lengths need no attention
    padding. When a row grows past LongRoPE's original_max_position_embeddings, its cache (built with the
    short factors) is recomputed once with the long factors, as the reference does (Phi-3-vision's reference
    does not: recompute_on_long_switch=False reproduces it, the old keys keep the short factors).
    """
    cfg = model.config
    if not prompts:
        return
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lens = [len(p.ids) for p in prompts]
    if min(lens) == 0:
        raise InputError("empty prompt: give at least one token")
    limit = check_prompt_fits(max(lens), cfg, max_context)
    B = len(prompts)
    budget = [min(params.max_new_tokens, limit - n) for n in lens]
    if max(budget) == 0:  # max_new_tokens=0: nothing to generate, so no prefill either
        return
    cache_len = max(n + b for n, b in zip(lens, budget))
    cache = KVCache.for_model(cfg, B, cache_len, dtype=dtype, device=device)
    sample = make_sampler(params, device)
    seqs = [list(p.ids) for p in prompts]
    is_long = [model.rotary.needs_long(n) for n in lens]
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor([t for t in p.ids if t >= 0], dtype=torch.long, device=device)] = True

    with torch.no_grad():
        # prefill: right-padded batch, each row at positions 0..len-1
        T = max(lens)
        embeds = torch.zeros(B, T, cfg.hidden_size, dtype=dtype, device=device)
        for b, p in enumerate(prompts):
            embeds[b, :lens[b]] = _embed(model, p, p.ids, device)
        pos = torch.arange(T, device=device).expand(B, T)
        long = torch.tensor(is_long, device=device)
        at = torch.tensor(lens, device=device) - 1
        logits = model(inputs_embeds=embeds, pos=pos, cache=cache, kv_len=T, long_rope=long, logits_at=at)[:, -1]
        running = [b for b in range(B) if budget[b] > 0]
        while running:
            logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            tokens = sample(logits)
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            host = tokens.tolist()  # one sync per step: stop checks and streaming need the ids
            steps, still = [], []
            for b in running:
                seqs[b].append(host[b])
                n_new = len(seqs[b]) - lens[b]
                reason = "stop" if host[b] in stop_ids else ("length" if n_new >= budget[b] else None)
                steps.append(Step(b, host[b], reason))
                if reason is None:
                    still.append(b)
            yield steps
            running = still
            if not running:
                break
            logits = _decode(model, prompts, seqs, cache, tokens, is_long, running, device, recompute_on_long_switch)


def _decode(model, prompts, seqs, cache, tokens, is_long, running, device, recompute: bool):
    """One decode step for every row (finished rows compute too; their output is ignored, their cache never
    recomputed)."""
    pos_host = [len(s) - 1 for s in seqs]
    pos = torch.tensor(pos_host, device=device)[:, None]
    long_host = [model.rotary.needs_long(p + 1) for p in pos_host]
    kv_len = max(pos_host) + 1
    logits = model(tokens[:, None], pos=pos, cache=cache, kv_len=kv_len,
                   long_rope=torch.tensor(long_host, device=device))[:, -1]
    for b in running:
        if recompute and long_host[b] and not is_long[b]:
            # the row just crossed the LongRoPE boundary: recompute its whole cache with the long factors
            is_long[b] = True
            n = len(seqs[b])
            x = _embed(model, prompts[b], seqs[b], device)[None]
            row_logits = model(inputs_embeds=x, pos=torch.arange(n, device=device)[None], cache=cache.rows(b, b + 1),
                               kv_len=n, long_rope=torch.ones(1, dtype=torch.bool, device=device),
                               logits_at=torch.tensor([n - 1], device=device))
            logits[b] = row_logits[0, -1]
    return logits
