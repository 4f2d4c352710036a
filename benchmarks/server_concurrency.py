"""Decode throughput over HTTP: one streaming client against N concurrent ones, on the same server in one run.

    python benchmarks/server_concurrency.py [--model DIR] [--clients 16] [--tokens 48]

Without --model a tiny random Phi-3.5-mini-shaped checkpoint is made in a temporary folder. Prints tokens/s for one
client and for N, and their ratio (the engine batches concurrent requests, so N clients should get more tokens/s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from phi3v.api import load
from phi3v.checkpoint.random import create_random
from phi3v.serve.app import Settings, create_app, running

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "Phi-3.5-mini-instruct"


def rate(client, name: str, clients: int, tokens: int) -> float:
    """Generated tokens per second with `clients` concurrent streaming requests."""
    counts = [0] * clients

    def ask(i: int) -> None:
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}?"}],
            max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
        counts[i] = [ch for ch in stream][-1].usage.completion_tokens

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or create_random(REFERENCE, Path(tmp) / "tiny", seed=1, std=0.15, dtype="float32", layers=2,
                                           hidden=96, heads=6, kv_heads=2, intermediate=128)
        model = load(path, dtype="float32")
        with running(create_app(model, Settings(max_batch=args.clients, max_context=512))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            name = client.models.list().data[0].id
            rate(client, name, 1, 8)  # warm-up
            one = rate(client, name, 1, args.tokens)
            many = rate(client, name, args.clients, args.tokens)
    print(f"decode over HTTP: 1 client {one:.0f} tok/s, {args.clients} clients {many:.0f} tok/s "
          f"({many / one:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
