"""`phi3v train {sft,pretrain} --model DIR --data FILE ...`: flags generated from TrainConfig's fields."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from phi3v.train.config import TASKS, TrainConfig

HELP = "fine-tune (sft) or pretrain a checkpoint on JSONL data; resumable, exports a Hugging Face folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`grad_accum` -> --grad-accum), defaults left to TrainConfig and --config."""
    parser.add_argument("task", choices=TASKS, help="what to train")
    parser.add_argument("--config", default=None, help="TOML or YAML file whose keys are these flags' names")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "task":
            continue
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, False, []):
            help_text += f" (default {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            help=help_text, **meta)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig defaults < the --config file < the flags given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from phi3v.train.distributed import rank_and_world
    from phi3v.train.run import fit, prepare

    cfg = config_from_args(args).check()
    setup = prepare(cfg)  # joins torchrun's process group
    if rank_and_world()[0] != 0:  # the other ranks train silently: rank 0 reports for all of them
        fit(setup, None)
        return 0
    for where, reason in setup.bad.items:
        print(f"bad record {where}: {reason}", file=sys.stderr)
    print(f"data: {setup.bad.summary(setup.records_read)}; {len(setup.samples)} training samples"
          + (f", {len(setup.eval_samples)} eval samples" if cfg.eval_data else ""), file=sys.stderr)
    bar = None

    def progress(record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=record["total_steps"], desc=cfg.task, unit="step", file=sys.stderr)
        if record["split"] == "eval":
            bar.write(f"step {record['step']}: eval loss {record['loss']:.4f}")
            return
        bar.n = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    try:
        result = fit(setup, progress)
    finally:
        if bar is not None:
            bar.close()
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}", file=sys.stderr)
    print(f"trained {result.steps} steps, final loss {result.last.get('loss', float('nan')):.4f}; model in {result.out}")
    return 0
