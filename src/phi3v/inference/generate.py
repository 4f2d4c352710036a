"""One-off batched generation: a thin layer over the continuous-batching Engine."""

from __future__ import annotations

from typing import Iterator

from ..errors import InputError
from ..models.layers import CausalLM
from .engine import Engine
from .requests import Prompt, Step, check_prompt_fits
from .sampling import SamplingParams


def generate_steps(model: CausalLM, prompts: list[Prompt], params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
                   max_context: int | None = None, recompute_on_long_switch: bool = True,
                   engine=None) -> Iterator[list[Step]]:
    """Generate for a batch of prompts; yield, after each engine step, the new tokens (Step.row = prompt index).

    Runs on `engine` when given (its cache may already hold a prefix), else on a one-off Engine sized for
    exactly this batch. When a row grows past LongRoPE's
    original_max_position_embeddings, its cache (built with the short factors) is recomputed once with the
    long factors, as the reference does (Phi-3-vision's reference does not: recompute_on_long_switch=False).
    """
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
