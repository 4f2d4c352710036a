"""The engine thread: one background thread owns the continuous-batching Engine and steps it while there is work.
Requests reach it through a thread-safe inbox; each job's outputs go back through the job's sink. A job whose
generation fails (the engine isolates it: finish_reason "error") gets the exception; the other jobs go on."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ..api import TextRow
from ..hardware import trim_heap
from ..inference.engine import ERROR, Engine
from ..inference.requests import Prompt
from ..inference.sampling import SamplingParams
from .protocol import Out

IDLE_POLL_S = 0.5  # how often an idle engine thread wakes to check for shutdown
TRIM_EVERY_S = 10.0  # how often freed heap memory goes back to the OS (a few ms): RSS follows what is in use


@dataclass
class Job:
    prompt: Prompt
    params: list[SamplingParams]  # one per choice
    stop_ids: frozenset[int]
    processors: list[list]  # per choice
    logprobs: int | None
    sink: object  # fn(list[Out] | Exception), called on the engine thread
    ticket: int = 0
    rows: dict = field(default_factory=dict)  # engine request id -> (choice index, TextRow)


class QueueFull(Exception):
    pass


class EngineFailure(Exception):
    """The engine step itself failed (a bug): every job in flight ends with it, the thread goes on serving."""


class Worker:
    """Owns the engine: adds, steps and cancels on its own thread; everything else talks to it through the inbox."""

    def __init__(self, model, engine: Engine, max_queue: int):
        self.model, self.engine, self.max_queue = model, engine, max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()
        self.in_inbox = self.waiting = 0  # engine requests not yet added / added but waiting for a slot
        self.running = 0
        self.generated = 0
        self._tickets = 0
        self._trimmed = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="phi3v-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue a job; raises QueueFull when the waiting requests would exceed max_queue."""
        with self.lock:
            if self.in_inbox + self.waiting + len(job.params) > self.max_queue:
                raise QueueFull
            self.in_inbox += len(job.params)
            self._tickets += 1
            job.ticket = self._tickets
        self.inbox.put(("add", job))
        return job.ticket

    def cancel(self, ticket: int) -> None:
        self.inbox.put(("cancel", ticket))

    def stop(self) -> None:
        """Cancel what is left and end the thread."""
        self.inbox.put(("stop", None))
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:  # wait for work while idle; otherwise only pick up what is there
                busy = self.engine.has_work()
                msgs = [self.inbox.get_nowait() if busy else self.inbox.get(timeout=IDLE_POLL_S)]
            except queue.Empty:
                msgs = []
            while True:  # everything queued so far, without blocking
                try:
                    msgs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, arg in msgs:
                if kind == "stop":
                    for ticket in list(self.jobs):
                        self._cancel(ticket)
                    return
                self._add(arg) if kind == "add" else self._cancel(arg)
            if self.engine.has_work():
                try:
                    steps = self.engine.step()
                    self._count()  # before any token goes out: what a client has seen, /metrics already shows
                    self._dispatch(steps)
                except Exception as e:  # a bug, not a bad request: fail what is running, keep serving
                    for ticket, job in list(self.jobs.items()):
                        self._cancel(ticket)  # forgotten before the client hears: it may look at once
                        job.sink(EngineFailure(f"{type(e).__name__}: {e}"))
            self._count()
            if time.monotonic() - self._trimmed > TRIM_EVERY_S:
                trim_heap()
                self._trimmed = time.monotonic()

    def _count(self) -> None:
        with self.lock:
            self.waiting, self.running = len(self.engine.waiting), len(self.engine.running)

    def _add(self, job: Job) -> None:
        try:
            for i, (params, procs) in enumerate(zip(job.params, job.processors)):
                rid = self.engine.add(job.prompt, params, job.stop_ids, processors=procs, logprobs=job.logprobs)
                job.rows[rid] = (i, TextRow(self.model.tokenizer, params.stop))
            self.jobs[job.ticket] = job
        except Exception as e:  # the handler checked the prompt: this is unexpected
            job.sink(e)
            for rid in job.rows:
                self.engine.cancel(rid)
        finally:
            with self.lock:
                self.in_inbox -= len(job.params)
                self.waiting = len(self.engine.waiting)

    def _cancel(self, ticket: int) -> None:
        job = self.jobs.pop(ticket, None)
        for rid in job.rows if job else ():
            self.engine.cancel(rid)

    def _dispatch(self, steps) -> None:
        owner = {rid: job for job in self.jobs.values() for rid in job.rows}
        batches: dict[int, list[Out]] = {}
        failed: dict[int, Exception] = {}
        for s in steps:
            job = owner.get(s.row)
            error = self.engine.failures.pop(s.row, None)
            if job is None or s.row not in job.rows or job.ticket in failed:
                continue
            if s.finish_reason == ERROR:
                failed[job.ticket] = error or RuntimeError("generation failed")
                continue
            index, row = job.rows[s.row]
            if s.token < 0:  # no room for any token
                delta, row.finish_reason = "", s.finish_reason
            else:
                delta = row.push(s.token, s.finish_reason, job.stop_ids)
                self.generated += 1
            if row.finish_reason is not None:
                if s.finish_reason is None:  # a stop string ended it: free the slot now
                    self.engine.cancel(s.row)
                del job.rows[s.row]
            batches.setdefault(job.ticket, []).append(
                Out(index, delta, s.token, row.finish_reason, s.logprob, s.top_logprobs, len(row.token_ids)))
        # A finished job is forgotten (its rows freed) before its last words go out: the client may look at once.
        for ticket, error in failed.items():  # its other choices end too; nothing more is sent to it
            batches.pop(ticket, None)
            job = self.jobs[ticket]
            self._cancel(ticket)
            job.sink(error)
        for ticket, outs in batches.items():
            job = self.jobs[ticket]
            if not job.rows:
                del self.jobs[ticket]
            job.sink(outs)
