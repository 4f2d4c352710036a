"""`phi3v synth`: write the synthetic document set (menus, charts, tables, text, shapes) with a progress bar."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..data.synth import FAMILIES, SPLITS, generate, split_size
from ..errors import InputError

HELP = "render synthetic menus, charts, tables, text and shapes with questions, captions and DPO pairs"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must be empty or new)")
    p.add_argument("--n", type=int, required=True, help="images in the train split; the others get n // 10 "
                   "(at least one per family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", type=_names, default=list(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--split", type=_names, default=list(SPLITS), help=f"comma list of {','.join(SPLITS)}")


def run(args) -> int:
    if args.n <= 0:
        raise InputError(f"--n must be a positive number of images, got {args.n}")
    total = sum(split_size(s, args.n, len(args.families)) for s in args.split if s in SPLITS)
    with tqdm(total=total, unit="img", desc="synth") as bar:
        summary = generate(args.out, args.n, seed=args.seed, families=args.families, splits=args.split,
                           progress=bar.update)
    for split, families in summary["images"].items():
        counts = ", ".join(f"{f} {c}" for f, c in families.items())
        print(f"{split}: {sum(families.values())} images ({counts}), {summary['qa'][split]} questions")
    print(f"wrote {summary['out']}")
    return 0
