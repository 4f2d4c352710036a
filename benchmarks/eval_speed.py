"""Time `phi3v eval` on synthetic questions: items/s and total time, batched, beside a batch-1 baseline.

    python benchmarks/eval_speed.py --model DIR --data SYNTH_DIR [--n 1000] [--batch 8] [--split test]
                                    [--max-new-tokens N] [--baseline-n 32] [--threads T]

The goal (issue #10): 1,000 synthetic questions under 10 minutes on a 2-core CPU with a small model. The
baseline runs the first --baseline-n items one at a time in the same process, so the speed-up is measured on
this machine, not assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import phi3v
from phi3v.eval import runner
from phi3v.eval.tasks import get_task


def timed(model, task, items, batch, max_new_tokens):
    """The report, wall seconds and process CPU seconds (all threads) of one evaluation."""
    t, c = time.perf_counter(), time.process_time()
    rep = runner.evaluate(model, task, items, batch=batch, max_new_tokens=max_new_tokens)
    return rep, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a `phi3v synth` folder (or its split folder / qa.jsonl)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the synth task's per-kind budget")
    p.add_argument("--baseline-n", type=int, default=32, help="items timed at batch 1 (0: no baseline)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task("synth")
    items = task.load(args.data, args.split)[:args.n]
    if len(items) < args.n:
        print(f"note: the data has only {len(items)} questions (asked for {args.n})", file=sys.stderr)
    t = time.perf_counter()
    model = phi3v.load(args.model)
    load_s = time.perf_counter() - t

    rep, total, cpu = timed(model, task, items, args.batch, args.max_new_tokens)
    out = {"n": len(items), "batch": args.batch, "load_s": round(load_s, 2), "total_s": round(total, 2),
           "cpu_s": round(cpu, 2), "decode_budget_tokens": sum(b for b, _ in runner.batches(task, items, args.batch,
                                                                                           args.max_new_tokens)),
           "items_per_s": round(len(items) / total, 3), "overall": rep["overall"],
           "generated_chars": sum(len(r["prediction"]) for r in rep["items"]), "threads": torch.get_num_threads()}
    if args.baseline_n:
        sub = items[:args.baseline_n]
        _, b1, _ = timed(model, task, sub, 1, args.max_new_tokens)
        _, bb, _ = timed(model, task, sub, args.batch, args.max_new_tokens)
        out.update(baseline_n=len(sub), batch1_items_per_s=round(len(sub) / b1, 3),
                   batched_items_per_s_same_items=round(len(sub) / bb, 3), speedup_vs_batch1=round(b1 / bb, 2))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['n']} synthetic questions, batch {args.batch}, {out['threads']} threads: "
              f"{out['total_s']:.1f} s total ({out['items_per_s']:.2f} items/s; {out['cpu_s']:.1f} CPU s; "
              f"model load {out['load_s']:.1f} s)")
        if args.baseline_n:
            print(f"same {out['baseline_n']} items: batch 1 {out['batch1_items_per_s']:.2f} items/s, "
                  f"batch {args.batch} {out['batched_items_per_s_same_items']:.2f} items/s "
                  f"(x{out['speedup_vs_batch1']:.2f})")
        print(f"goal: 1000 questions under 600 s -> {'met' if out['total_s'] * 1000 / out['n'] < 600 else 'NOT met'}"
              f" (projected {out['total_s'] * 1000 / out['n']:.0f} s for 1000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
