"""Continuous batching over a static KV cache: requests join and leave between decode steps.

Each engine step runs one batched prefill chunk of the requests still prefilling (so a long prompt never
stalls the running decodes) and one batched decode step for every decoding request. The cache has `max_batch` slots of `max_context` tokens,
allocated once; a slot keeps its tokens after its request ends, so a later request that starts with the same
tokens (the next turn of a chat) only computes what is new.

With `isolate_failures`, an error while sampling one request (NaN logits, a logits processor or sampler that raises)
ends that request alone with finish_reason "error" (the exception is kept in `failures`); the batch goes on.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..models.cache import KVCache
from ..errors import ContextLengthError, InputError
from .requests import Prompt, Step, check_prompt_fits, embed_ids
from .sampling import SamplingError, SamplingParams, apply_repetition_penalty, make_sampler

PREFILL, DECODE, FINISHED = "prefill", "decode", "finished"
ERROR = "error"  # the finish_reason of a request that failed alone (see Engine.failures)


@dataclass
class Stats:
    """Work done and time spent, split by phase (for benchmarks and the server's metrics)."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens fed to decode steps
    decode_s: float = 0.0


@dataclass(eq=False)  # compared by identity: `r in rows` must not compare prompts (their embedding tensors)
class Request:
    prompt: Prompt
    params: SamplingParams
    stop_ids: frozenset[int]
    id: int = 0
    seq: list[int] = field(default_factory=list)  # prompt + generated tokens (image placeholders < 0)
    key: list = field(default_factory=list)  # what identifies the cached tokens (images by digest)
    slot: int = -1
    state: str = PREFILL
    done: int = 0  # positions whose keys/values are in the cache
    long: bool = False  # LongRoPE factors the cache was built with
    budget: int = 0
    sampler: object = None
    processors: list = field(default_factory=list)  # fn(generated ids, logits (1, V)) -> logits, e.g. JSON mode
    logprobs: int | None = None  # report the sampled token's log-probability and this many alternatives

    @property
    def n_generated(self) -> int:
        return len(self.seq) - len(self.prompt.ids)


@dataclass
class Slot:
    key: list = field(default_factory=list)  # tokens whose keys/values the slot holds (positions 0..len-1)
    long: bool = False
    busy: bool = False


class Engine:
    """Schedules requests onto `max_batch` cache slots of `max_context` tokens each."""

    def __init__(self, model, max_batch: int = 8, max_context: int = 4096, prefill_chunk: int = 512,
                 recompute_on_long_switch: bool = True, kv_budget: int | None = None, compile: bool = False,
                 isolate_failures: bool = False):
        cfg = model.config
        self.model, self.cfg = model, cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        max_context = min(max_context, cfg.max_position_embeddings)
        if kv_budget is not None:
            per_token = KVCache.nbytes_for(cfg, 1, 1, self.dtype)
            if max_batch * max_context * per_token > kv_budget:
                raise ContextLengthError(
                    f"a KV cache of {max_batch} x {max_context} tokens needs "
                    f"{max_batch * max_context * per_token / 2**20:.0f} MiB, over the budget of "
                    f"{kv_budget / 2**20:.0f} MiB; lower max_batch or max_context, or raise the budget")
        self.max_batch, self.max_context, self.prefill_chunk = max_batch, max_context, prefill_chunk
        self.recompute = recompute_on_long_switch
        # Optional torch.compile of the decode step (dynamic shapes: the batch and the cache length change).
        # Off by default: on a 2-core AVX-512 CPU it measured 2.3x slower than eager (`phi3v bench --compile`).
        self.decode_forward = torch.compile(model, dynamic=True) if compile else model
        # one extra position per row: a dump that rows not decoding write to and nobody reads
        self.cache = KVCache.for_model(cfg, max_batch, max_context + 1, self.dtype, self.device)
        self.dump = max_context
        self.slots = [Slot() for _ in range(max_batch)]
        self.seen = torch.zeros(max_batch, cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}
        self._ids = itertools.count()
        self.reused_tokens = 0  # prompt tokens whose keys/values came from a previous request
        self.isolate_failures = isolate_failures
        self.failures: dict[int, Exception] = {}  # request id -> why it ended with finish_reason "error"
        self.stats = Stats()

    # ---- requests ----
    def add(self, prompt: Prompt, params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
            key: list | None = None, processors: list | None = None, logprobs: int | None = None) -> int:
        """Queue a request; errors (empty or too long a prompt) come before any work. Returns its id.
        processors: fn(generated ids, logits (1, V)) -> logits, applied in order before sampling."""
        if not prompt.ids:
            raise InputError("empty prompt: give at least one token")
        check_prompt_fits(len(prompt.ids), self.cfg, self.max_context)
        budget = min(params.max_new_tokens, self.max_context - len(prompt.ids))
        key = key if key is not None else (prompt.key if prompt.key is not None else prompt.ids)
        req = Request(prompt, params, stop_ids, next(self._ids), list(prompt.ids), list(key), budget=budget,
                      processors=list(processors or []), logprobs=logprobs)
        req.sampler = make_sampler(params, self.device)
        self.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running); its slot is free for the next one."""
        self.waiting = [r for r in self.waiting if r.id != request_id]
        self.failures.pop(request_id, None)
        req = self.running.pop(request_id, None)
        if req is not None:
            self._release(req)

    def is_active(self, request_id: int) -> bool:
        return request_id in self.running or any(r.id == request_id for r in self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> list[Step]:
        finished = []
        while self.waiting and any(not s.busy for s in self.slots):
            req = self.waiting.pop(0)
            if req.budget == 0:
                finished.append(Step(req.id, -1, "length"))
                continue
            req.long = self.model.rotary.needs_long(len(req.seq))
            req.slot, reuse = self._pick_slot(req)
            req.done = reuse
            self.reused_tokens += reuse
            self.slots[req.slot].busy = True
            self.seen[req.slot] = False
            if req.params.repetition_penalty != 1.0:
                ids = torch.tensor([t for t in req.seq if t >= 0], dtype=torch.long, device=self.device)
                self.seen[req.slot, ids] = True
            self.running[req.id] = req
        return finished

    def _pick_slot(self, req: Request) -> tuple[int, int]:
        """The free slot sharing the longest cached prefix with the request (built with the same LongRoPE
        factors), else the lowest free one. At least the last prompt token is always computed."""
        best, best_len = None, -1
        for i, s in enumerate(self.slots):
            if s.busy:
                continue
            n = 0
            if s.long == req.long:
                for a, b in zip(s.key, req.key):
                    if a != b:
                        break
                    n += 1
            n = min(n, len(req.seq) - 1)
            if n > best_len:
                best, best_len = i, n
        return best, best_len

    def _release(self, req: Request) -> None:
        slot = self.slots[req.slot]
        slot.busy, slot.long = False, req.long
        slot.key = (req.key + req.seq[len(req.prompt.ids):])[:req.done]

    # ---- one scheduler iteration ----
    def step(self) -> list[Step]:
        """Admit waiting requests, run one prefill chunk and one decode step; return the new tokens."""
        out = self._admit()
        with torch.no_grad():
            t0 = time.perf_counter()
            out += self._prefill()
            t1 = time.perf_counter()
            out += self._decode()
            t2 = time.perf_counter()
        self.stats.prefill_s += t1 - t0
        self.stats.decode_s += t2 - t1
        for s in out:
            if s.finish_reason is not None and s.row in self.running:
                self._release(self.running.pop(s.row))
        return out

    def _prefill(self) -> list[Step]:
        """One chunk (up to prefill_chunk tokens) of every request still prefilling, in one batched forward.
        Rows of the batch that are not prefilling write to the dump position."""
        reqs = [r for r in self.running.values() if r.state == PREFILL]
        if not reqs:
            return []
        lo, hi = min(r.slot for r in reqs), max(r.slot for r in reqs) + 1
        spans = {r.slot: (r.done, min(len(r.seq), r.done + self.prefill_chunk)) for r in reqs}
        T = max(e - s for s, e in spans.values())
        x = torch.zeros(hi - lo, T, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        pos = torch.full((hi - lo, T), self.dump, dtype=torch.long)
        long = torch.zeros(hi - lo, dtype=torch.bool)
        at = torch.zeros(hi - lo, dtype=torch.long)
        for r in reqs:
            start, end = spans[r.slot]
            b = r.slot - lo
            x[b, :end - start] = embed_ids(self.model, r.prompt, r.seq, start, end, self.device)
            pos[b, :end - start] = torch.arange(start, end)
            long[b], at[b] = r.long, end - start - 1
        kv_len = max(e for _, e in spans.values())
        self.stats.prefill_tokens += sum(e - s for s, e in spans.values())
        logits = self.model(inputs_embeds=x, pos=pos.to(self.device), cache=self.cache.rows(lo, hi), kv_len=kv_len,
                            long_rope=long.to(self.device), logits_at=at.to(self.device))[:, -1]
        out = []
        for r in reqs:
            r.done = spans[r.slot][1]
            if r.done == len(r.seq):
                r.state = DECODE
                out.append(self._sample_one(r, logits[r.slot - lo]))
        return out

    def _decode(self) -> list[Step]:
        rows = [r for r in self.running.values() if r.state == DECODE]
        for r in rows:
            if self.recompute and not r.long and self.model.rotary.needs_long(len(r.seq)):
                # crossing original_max_position_embeddings: recompute the whole cache with the long factors
                r.state, r.long, r.done = PREFILL, True, 0
        rows = [r for r in rows if r.state == DECODE]
        if not rows:
            return []
        hi = max(r.slot for r in rows) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.full((hi, 1), self.dump, dtype=torch.long)
        long = torch.zeros(hi, dtype=torch.bool)
        for r in rows:
            tokens[r.slot, 0], pos[r.slot, 0] = r.seq[-1], len(r.seq) - 1
            long[r.slot] = r.long or self.model.rotary.needs_long(len(r.seq))
        kv_len = max(len(r.seq) for r in rows)
        self.stats.decode_tokens += len(rows)
        logits = self.decode_forward(tokens.to(self.device), pos=pos.to(self.device), cache=self.cache.rows(0, hi),
                            kv_len=kv_len, long_rope=long.to(self.device))[:, -1]
        out = []
        greedy = [r for r in rows if r.params.greedy and r.params.repetition_penalty == 1.0
                  and not r.processors and r.logprobs is None]
        if greedy:  # one host sync for all greedy rows: their tokens and whether their logits hold a NaN
            best, nan = torch.stack([logits.argmax(dim=-1), logits.isnan().any(dim=-1)]).tolist()
            out += [self._fail(r, SamplingError("the model produced NaN logits for this request")) if nan[r.slot]
                    else self._finish(r, best[r.slot]) for r in greedy]
        out += [self._sample_one(r, logits[r.slot]) for r in rows if r not in greedy]
        for r in rows:
            r.done = len(r.seq) - 1  # the token fed this step is now in the cache
        return out

    def _sample_one(self, req: Request, logits: torch.Tensor) -> Step:
        """_sample, or with isolate_failures, the request's end with finish_reason "error" if sampling it fails."""
        if not self.isolate_failures:
            return self._sample(req, logits)
        try:
            return self._sample(req, logits)
        except Exception as e:  # this request's processor, sampler or logits: the others go on
            return self._fail(req, e)

    def _fail(self, req: Request, error: Exception) -> Step:
        if not self.isolate_failures:
            raise error
        self.failures[req.id] = error
        req.state = FINISHED
        return Step(req.id, -1, ERROR)

    def _sample(self, req: Request, logits: torch.Tensor) -> Step:
        logits = logits.float()[None]
        if req.params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.seen[req.slot:req.slot + 1], req.params.repetition_penalty)
        for fn in req.processors:
            logits = fn(req.seq[len(req.prompt.ids):], logits)
        step = self._finish(req, int(req.sampler(logits)[0]))
        if req.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            step.logprob = float(lp[step.token])
            if req.logprobs > 0:
                top = torch.topk(lp, req.logprobs)
                step.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        return step

    def _finish(self, req: Request, token: int) -> Step:
        req.seq.append(token)
        if req.params.repetition_penalty != 1.0:
            self.seen[req.slot, token] = True
        if token in req.stop_ids:
            reason = "stop"
        elif req.n_generated >= req.budget:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            req.state = FINISHED
        return Step(req.id, token, reason)
