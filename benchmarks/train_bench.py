"""Training throughput of phi3v beside transformers on the same tiny text model, batch and sequence length.

Each backend runs in its own child process (so peak RSS is its own), one invocation measures all of them, in
--rounds alternating rounds (the median counts, against load from other processes):
    python benchmarks/train_bench.py [--model DIR] [--batch 4] [--length 256] [--steps 10] [--rounds 3] [--device cpu]
Prints one JSON line per backend (median tokens/s, samples/s, peak RSS MiB, final loss) and the phi3v / transformers
ratios.
Another backend (e.g. phi3v LoRA vs transformers + peft) is one more entry in BACKENDS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"


def batch_ids(args) -> torch.Tensor:
    return torch.randint(0, 32000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))


def phi3v_step(args):
    from phi3v.checkpoint.load import load_causal_lm
    from phi3v.data.collate import Batch
    from phi3v.models import load_config
    from phi3v.train.loop import make_optimizer
    from phi3v.train.losses import next_token_loss

    model = load_causal_lm(Path(args.model), load_config(args.model), torch.float32, args.device).train()
    opt = make_optimizer([{"name": "all", "params": list(model.parameters())}], 1e-4)
    ids = batch_ids(args).to(args.device)
    batch = Batch(ids, ids.clone(), torch.ones_like(ids, dtype=torch.bool))

    def step():
        out = next_token_loss(model, batch, checkpointing=args.checkpointing)
        (out.total / out.units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.total.item() / out.units
    return step


def transformers_step(args):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(args.device).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = batch_ids(args).to(args.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


BACKENDS = {"phi3v": phi3v_step, "transformers": transformers_step}


def measure(args) -> dict:
    step = BACKENDS[args.backend](args)
    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    n = args.steps * args.batch
    return {"backend": args.backend, "tokens_per_s": n * args.length / elapsed, "samples_per_s": n / elapsed,
            "peak_rss_mib": rss, "final_loss": loss, "batch": args.batch, "length": args.length,
            "steps": args.steps, "device": args.device, "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="text checkpoint folder (default: a random tiny Phi-3.5-mini)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of every backend; medians are reported")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.backend:
        print(json.dumps(measure(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from phi3v.checkpoint.random import create_random

            args.model = str(create_random(TEXT_LIKE, tmp, seed=0, layers=4, hidden=256, heads=8, intermediate=512,
                                           dtype="float32"))
        runs: dict[str, list[dict]] = {}
        names = args.backends.split(",")
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                child = [sys.executable, __file__, "--backend", name, "--model", args.model, "--batch",
                         str(args.batch), "--length", str(args.length), "--steps", str(args.steps), "--warmup",
                         str(args.warmup), "--device", args.device] + (["--checkpointing"] if args.checkpointing else [])
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        results = {}
        for name, rs in runs.items():
            rs = sorted(rs, key=lambda x: x["tokens_per_s"])
            results[name] = {**rs[len(rs) // 2], "rounds": len(rs), "tokens_per_s_all": [x["tokens_per_s"] for x in rs]}
            print(json.dumps(results[name]))
    if "phi3v" in results and "transformers" in results:
        a, b = results["phi3v"], results["transformers"]
        print(json.dumps({"phi3v/transformers tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                          "phi3v/transformers peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
