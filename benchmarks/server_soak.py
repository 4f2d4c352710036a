"""Soak test of `phi3v serve`: N minutes of mixed clients against one server on 127.0.0.1, then the pass criteria.

    python benchmarks/server_soak.py [--model DIR] [--minutes 1] [--clients 8] [--max-requests 100000]

The server runs in a child process (its RSS is what is measured). Clients mix: non-streaming and streaming greedy
chats, chats with an image, JSON mode, streams dropped at a random point, and bad requests. Prints requests/s,
p50/p99 latency, errors by kind and RSS over time. Passes when no response is a 5xx, every completed temperature-0
answer equals its solo answer (asked alone before the soak), and RSS grows under 5% after the warm-up (the first
fifth of the run, at least 30 s): the peak of the last fifth of the samples after it over the peak of the first.
Without --model: the tiny Phi-3.5-vision fixture of ../shared.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "phi3v" / "phi35_vision_tiny"
PROMPTS = [f"Question {i}: tell me about the number {i * 7}." for i in range(6)]
BAD = [  # each must be answered 4xx
    {"temperature": 5}, {"seed": 2**64}, {"repetition_penalty": 0}, {"messages": []}, {"model": "nope"},
    {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"max_tokens": 10**9}, {"n": 99},
]
MAX_TOKENS = 24
WARM_UP_S = 30.0  # the warm-up is the first fifth of the run, at least this long (at most half of it)


def serve(model_path: str, conn) -> None:
    """The child: load, serve on a free loopback port, send the URL, serve until the parent says stop."""
    from phi3v.api import load
    from phi3v.serve.app import Settings, create_app, running

    model = load(model_path, dtype="float32")
    app = create_app(model, Settings(max_batch=8, max_context=2048, max_images=2, max_queue=256))
    with running(app, "127.0.0.1", 0) as url:
        conn.send(url)
        conn.recv()


class Soak:
    def __init__(self, url: str, name: str, image_url: str, seed: int):
        self.url, self.name, self.image_url = url, name, image_url
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.latency: list[float] = []
        self.kinds: Counter = Counter()
        self.errors: Counter = Counter()
        self.solo: dict = {}
        self.count = 0

    def body(self, kind: str, i: int) -> dict:
        content = PROMPTS[i]
        if kind == "image":
            content = [{"type": "text", "text": "What does this chart show?"},
                       {"type": "image_url", "image_url": {"url": self.image_url}}]
        body = {"model": self.name, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
                "temperature": 0}
        if kind == "json":
            body.update(temperature=1.0, seed=i, response_format={"type": "json_object"})
        return body

    def ask(self, http: httpx.Client, kind: str, i: int, rng: random.Random) -> str | None:
        """One request of a kind; returns the answer's text (None for kinds that have none), records errors."""
        if kind == "bad":
            r = http.post("/v1/chat/completions", json={**self.body("text", i), **rng.choice(BAD)})
            if not 400 <= r.status_code < 500:
                self.error(f"bad request answered {r.status_code}")
            return None
        body = self.body("text" if kind in ("stream", "drop") else kind, i)
        if kind in ("stream", "drop"):
            text, cut = [], rng.randint(1, 8) if kind == "drop" else None
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code >= 500:
                    self.error(f"5xx: {r.status_code}")
                for n, line in enumerate(r.iter_lines()):
                    if cut is not None and n >= cut:
                        return None  # leaves mid-stream: the connection closes
                    if line.startswith("data: {"):
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            self.error(f"stream error: {obj['error']['code']}")
                        for c in obj.get("choices", []):
                            text.append(c["delta"].get("content") or "")
            return "".join(text)
        r = http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            self.error(f"{kind} answered {r.status_code}")
            return None
        text = r.json()["choices"][0]["message"]["content"]
        if kind == "json":
            try:
                assert isinstance(json.loads(text), dict)
            except (ValueError, AssertionError):
                self.error("json mode answer is not a JSON object")
            return None
        return text

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1

    def client(self, deadline: float, max_requests: int, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                with self.lock:
                    if self.count >= max_requests:
                        return
                    self.count += 1
                kind = rng.choice(["text", "text", "stream", "stream", "image", "json", "drop", "bad"])
                i = rng.randrange(len(PROMPTS))
                t0 = time.perf_counter()
                try:
                    text = self.ask(http, kind, i, rng)
                except httpx.HTTPError as e:
                    self.error(f"client exception {type(e).__name__}")
                    continue
                dt = time.perf_counter() - t0
                with self.lock:
                    self.kinds[kind] += 1
                    if kind not in ("drop", "bad"):
                        self.latency.append(dt)
                key = ("image", 0) if kind == "image" else ("text", i)
                if text is not None and kind in ("text", "stream", "image") and text != self.solo[key]:
                    self.error(f"{kind} answer differs from its solo answer")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(FIXTURE))
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(args.model, child), daemon=True)
    proc.start()
    url = parent.recv()
    server = psutil.Process(proc.pid)
    try:
        from phi3v.examples import example_image

        image_url = "data:image/png;base64," + base64.b64encode(example_image().read_bytes()).decode()
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        soak = Soak(url, name, image_url, args.seed)
        with httpx.Client(base_url=url, timeout=120) as http:  # solo answers, one request at a time
            for i in range(len(PROMPTS)):
                soak.solo[("text", i)] = soak.ask(http, "text", i, soak.rng)
            soak.solo[("image", 0)] = soak.ask(http, "image", 0, soak.rng)
        start = time.monotonic()
        deadline = start + args.minutes * 60
        rss: list[tuple[float, float]] = []
        threads = [threading.Thread(target=soak.client, args=(deadline, args.max_requests, args.seed + k))
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - start, server.memory_info().rss / 2**20))
            time.sleep(args.rss_every)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        statuses = httpx.get(url + "/metrics").text
    finally:
        parent.send("stop")
        proc.join(30)

    five = [ln for ln in statuses.splitlines() if ln.startswith("phi3v_requests_total") and 'code="5' in ln]
    warm_up = min(max(elapsed / 5, WARM_UP_S), elapsed / 2)
    warm = [m for t, m in rss if t >= warm_up] or [m for _, m in rss]
    k = max(1, len(warm) // 5)  # growth: the peak of the last fifth after warm-up over the peak of the first fifth
    growth = (max(warm[-k:]) / max(warm[:k]) - 1) * 100 if warm else 0.0
    first = (max(warm) / warm[0] - 1) * 100 if warm else 0.0
    done = sum(soak.kinds.values())
    print(f"{done} requests in {elapsed:.0f} s from {args.clients} clients: {done / elapsed:.2f} requests/s")
    print(f"by kind: {dict(sorted(soak.kinds.items()))}")
    print(f"latency (completed, not dropped or bad): p50 {percentile(soak.latency, 0.5):.2f} s, "
          f"p99 {percentile(soak.latency, 0.99):.2f} s")
    print(f"errors by kind: {dict(soak.errors) or 'none'}")
    print("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss))
    print(f"server 5xx responses (from /metrics): {five or 'none'}")
    print(f"RSS after warm-up ({warm_up:.0f} s): first fifth peak {max(warm[:k]):.0f} MiB, last fifth peak "
          f"{max(warm[-k:]):.0f} MiB; highest sample over the first sample {first:+.1f}% (the heap's trim cycle "
          "moves single samples by a few percent)")
    checks = {"no 5xx": not five and not any("5xx" in k or " 5" in k for k in soak.errors),
              "temperature-0 answers equal their solo answers": not any("solo" in k for k in soak.errors),
              f"RSS growth after warm-up under 5% ({growth:+.1f}%)": growth < 5,
              "no other errors": not soak.errors}
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
