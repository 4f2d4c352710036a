"""`phi3v unlearn`: make a model forget a text ("Who's Harry Potter", Eldan & Russinovich 2023)."""

from __future__ import annotations

import argparse

from phi3v.train.unlearn import PLOT, REPORT, UnlearnConfig, unlearn

HELP = "forget a text: reinforced model, anchored-term translation, generic labels, fine-tuning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = UnlearnConfig(model="", forget="", out="")
    parser.add_argument("--model", required=True, help="checkpoint folder to unlearn from")
    parser.add_argument("--forget", required=True, help="text to forget: a text file, or JSONL conversations")
    parser.add_argument("--anchors", help="anchored terms -> generic translations: JSON object or TSV lines")
    parser.add_argument("--retain", help="text (or JSONL) whose perplexity the report compares before/after")
    parser.add_argument("--probes", help="JSONL {prompt, prefix (optional start of the answer), target}: held-out "
                        "completion checks and the plot of p(target) across the steps")
    parser.add_argument("--out", required=True, help="output folder: the unlearned model, report, plot")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help=f"v_generic = v_base - alpha * ReLU(v_reinforced - v_base) (default {d.alpha})")
    parser.add_argument("--block", type=int, default=d.block, help=f"tokens per text block (default {d.block})")
    parser.add_argument("--reinforce-steps", type=int, default=d.reinforce_steps,
                        help=f"steps of the reinforced model's fine-tuning (default {d.reinforce_steps})")
    parser.add_argument("--reinforce-lr", type=float, default=d.reinforce_lr, help=f"default {d.reinforce_lr}")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help=f"steps of fine-tuning towards the generic labels (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"blocks per step (default {d.batch})")
    parser.add_argument("--probe-every", type=int, default=d.probe_every,
                        help=f"probe the targets every K unlearning steps (default {d.probe_every})")
    parser.add_argument("--no-retain-mix", dest="retain_mix", action="store_false",
                        help="keep --retain out of the fine-tuning (the paper's recipe; by default it is mixed in "
                             "with its own tokens as labels, which keeps retained knowledge)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", default=d.dtype)
    parser.add_argument("--device", default=d.device)


def run(args) -> int:
    cfg = UnlearnConfig(model=args.model, forget=args.forget, out=args.out, anchors=args.anchors, retain=args.retain,
                        probes=args.probes, alpha=args.alpha, block=args.block, reinforce_steps=args.reinforce_steps,
                        reinforce_lr=args.reinforce_lr, steps=args.steps, lr=args.lr, batch=args.batch,
                        retain_mix=args.retain_mix, seed=args.seed, probe_every=args.probe_every, dtype=args.dtype, device=args.device)

    def progress(phase: str, record: dict) -> None:
        if record["step"] % 10 == 0:
            print(f"{phase} step {record['step']}: loss {record['loss']:.4f}", flush=True)

    result = unlearn(cfg, progress)
    b, a = result.report["before"], result.report["after"]
    print(f"familiarity {b['familiarity']:.4f} -> {a['familiarity']:.4f}")
    if b["retain_perplexity"] is not None:
        print(f"retained perplexity {b['retain_perplexity']:.3f} -> {a['retain_perplexity']:.3f}")
    if b["probe_completes"]:
        print(f"probes completed {sum(b['probe_completes'])}/{len(b['probe_completes'])} -> "
              f"{sum(a['probe_completes'])}/{len(a['probe_completes'])}")
    print(f"wrote {result.out} ({REPORT}, {PLOT})")
    return 0
