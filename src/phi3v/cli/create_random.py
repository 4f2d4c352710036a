"""`phi3v create-random`: a random-weight checkpoint in the real layout, with the real tokenizer files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint.random import Sizes, create_random
from .common import reference_dir

HELP = "write a random-weight checkpoint in the real layout"
VISION_HELP = "CLIP size (Phi-3-vision only); default: a 64-wide 3-layer CLIP when the decoder is resized"


def add_arguments(p) -> None:
    p.add_argument("--like", required=True, help="config.json or model folder (or a name in shared/reference)")
    p.add_argument("--out", required=True)
    for f in dataclasses.fields(Sizes):  # --layers, --hidden, ..., --vision-intermediate
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                       help=VISION_HELP if f.name.startswith("vision_") else None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--dtype", default="bfloat16")


def run(args) -> int:
    like = Path(args.like) if Path(args.like).exists() else reference_dir(args.like)
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    out = create_random(like, args.out, sizes, seed=args.seed, std=args.std, dtype=args.dtype)
    print(f"wrote a RANDOM-weight checkpoint shaped like {like} to {out}")
    return 0
