"""Composable batched sampling: logits processors and a sampler closure with an explicit torch.Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError, Phi3VError


MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (1 / T would overflow float32 long before T reaches 0)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or below MIN_TEMPERATURE) is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be a finite number > 0"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


FLOAT_MAX = torch.finfo(torch.float32).max


class SamplingError(Phi3VError):
    """One request's logits cannot be sampled from (NaN, or every token excluded): that request ends, no other."""


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As transformers: logits of tokens already seen are divided by the penalty if positive, else multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one token)."""
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # mass before this token already reaches p
    drop[..., 0] = False  # the most likely token always stays (p may round to 0 in float32)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def _check(bad: torch.Tensor) -> None:
    if bad.any():
        raise SamplingError("the logits of this request are NaN or exclude every token: nothing can be sampled")


def make_sampler(params: SamplingParams, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A closure (B, V) float logits -> (B,) token ids. Greedy below MIN_TEMPERATURE; seeded by params.seed.
    Rows with NaN logits, or no token left to draw, raise SamplingError instead of drawing garbage."""
    if params.greedy:
        def argmax(logits: torch.Tensor) -> torch.Tensor:
            _check(logits.isnan().any(dim=-1) | (logits.amax(dim=-1) == float("-inf")))
            return logits.argmax(dim=-1)

        return argmax
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()  # a fresh non-deterministic seed for this generator only (torch.seed() would reseed the global one)
    else:
        gen.manual_seed(params.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        # +inf (a huge logit over a tiny temperature or penalty) becomes the largest float: softmax stays finite
        logits = (logits.float() / params.temperature).clamp(max=FLOAT_MAX)
        if params.top_k:
            logits = top_k_filter(logits, params.top_k)
        if params.top_p < 1.0:
            logits = top_p_filter(logits, params.top_p)
        probs = logits.softmax(dim=-1)
        _check(~(probs >= 0).all(dim=-1) | ~(probs.sum(dim=-1) > 0))  # NaN anywhere, or nothing left to draw
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    return sample
