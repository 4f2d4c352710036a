"""`phi3v demo`: the Quick start job: make a small random Phi-3.5-vision checkpoint if needed, ask it about an image."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint.random import Sizes, create_random
from ..examples import example_image
from .common import load_model, reference_dir

HELP = "the Quick start: a random checkpoint and a first generation"
DEMO_LIKE = "Phi-3.5-vision-instruct"
DEMO_SIZES = Sizes(layers=4, hidden=256, heads=8, intermediate=512)


def add_arguments(p) -> None:
    p.add_argument("--out", default="checkpoints/random-phi3.5-vision")
    p.add_argument("--image", default=None, help="default: the bundled example chart")
    p.add_argument("--prompt", default="What does this chart show?")
    p.add_argument("--max-new-tokens", type=int, default=24)


def run(args) -> int:
    out = Path(args.out)
    if not (out / "config.json").is_file():
        print(f"creating a small RANDOM-weight Phi-3.5-vision checkpoint in {out} (no model can be downloaded here)...",
              file=sys.stderr)
        create_random(reference_dir(DEMO_LIKE), out, DEMO_SIZES, seed=0, std=0.1)
    args.model, args.dtype, args.device = str(out), "float32", "cpu"
    model = load_model(args)
    image = args.image or str(example_image())
    print(f"image> {image}\nuser> {args.prompt}\nassistant> ", end="", flush=True)
    for delta in model.stream(args.prompt, images=[image], max_new_tokens=args.max_new_tokens):
        sys.stdout.write(delta)
        sys.stdout.flush()
    print("\n(random weights: the answer above is noise. A real checkpoint: phi3v chat --model DIR)")
    return 0
