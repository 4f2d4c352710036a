"""`phi3v recipe nano --out DIR`: the whole phi3v-nano recipe (data, pretrain, SFT, DPO, evaluation) in a budget."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "run a training recipe end to end (nano: synthetic data -> pretrain -> SFT -> DPO -> eval); resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["nano"], help="the recipe: nano trains phi3v-nano")
    parser.add_argument("--out", required=True, help="output folder (data, phases, reports; OUT/final is the model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--budget-minutes", type=float, default=110,
                        help="wall-clock budget split over the phases (default 110)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    parser.add_argument("--train-images", type=int, default=None, help="synthetic training images (default: plan's)")
    parser.add_argument("--eval-images", type=int, default=None, help="images per held-out split (default: plan's)")
    parser.add_argument("--autocast", choices=["fastest", "bf16", "off"], default=None,
                        help="bf16 autocast while training: fastest (default: timed on one batch where the device has "
                             "native bf16, else off), bf16 or off; a run's OUT/recipe.json records the choice")
    parser.add_argument("--steps", default=None,
                        help="fixed optimizer steps per phase instead of the budget's plan, e.g. "
                             "pretrain=642,sft=850,dpo=40 (a run's OUT/recipe.json lists its counts: reruns it)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from phi3v.recipes.nano import NanoPlan, parse_steps, run_recipe

    plan = NanoPlan()
    if args.train_images is not None:
        plan.train_images = args.train_images
    if args.eval_images is not None:
        plan.eval_images = args.eval_images
    if args.autocast is not None:
        plan.autocast = args.autocast
    if args.steps:
        plan.steps = parse_steps(args.steps)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int, info: dict) -> None:
        bar = bars.get(phase)
        if bar is None:
            for b in bars.values():
                b.close()
            bar = bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, dynamic_ncols=True)
        if info.get("split") == "eval":
            bar.write(f"{phase} step {done}: val loss {info['loss']:.4f}")
            return
        bar.n = done
        if "loss" in info:
            bar.set_postfix(loss=f"{info['loss']:.4f}")
        bar.refresh()
    try:
        state = run_recipe(args.out, args.device, args.budget_minutes, args.seed, args.resume, plan, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    results = state.get("results", {})
    for split, r in results.get("eval", {}).items():
        cats = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["categories"].items())
        print(f"{split}: {100 * r['overall']:.1f}% exact match (n={r['n']}; {cats})")
    print(f"minutes per phase: {json.dumps(state['minutes'])}")
    print(f"model: {args.out}/final")
    return 0
