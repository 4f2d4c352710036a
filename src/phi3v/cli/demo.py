"""`phi3v demo`: the Quick start job: the bundled phi3v-nano answers a question about the bundled menu.

Without the bundled model (or with --random), a small random-weight Phi-3.5-vision checkpoint is made instead and
asked about the example chart: its answer is noise, labelled as such.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint.random import Sizes, create_random
from ..examples import NANO_DIR, example_image, example_menu
from .common import load_model, reference_dir

HELP = "the Quick start: phi3v-nano answers a question about the bundled menu"
DEMO_LIKE = "Phi-3.5-vision-instruct"
DEMO_SIZES = Sizes(layers=4, hidden=256, heads=8, intermediate=512)


def add_arguments(p) -> None:
    p.add_argument("--image", default=None, help="default: the bundled menu (the example chart with --random)")
    p.add_argument("--prompt", default=None, help="default: the menu's question")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--random", action="store_true", help="use a random-weight checkpoint instead of phi3v-nano")
    p.add_argument("--out", default="checkpoints/random-phi3.5-vision", help="where --random's checkpoint goes")


def _ask(model, image: str, prompt: str, max_new_tokens: int) -> str:
    print(f"image> {image}\nuser> {prompt}\nassistant> ", end="", flush=True)
    text = []
    for delta in model.stream(prompt, images=[image], max_new_tokens=max_new_tokens):
        text.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    print()
    return "".join(text)


def run(args) -> int:
    args.dtype, args.device, args.adapter = "float32", "cpu", None
    if not args.random and (NANO_DIR / "config.json").is_file():
        args.model = str(NANO_DIR)
        model = load_model(args)
        image, question, answer = example_menu()
        prompt = args.prompt or question
        got = _ask(model, args.image or str(image), prompt, args.max_new_tokens)
        if args.image is None and args.prompt is None:
            verdict = "right" if got.strip() == answer else "wrong"
            print(f"(phi3v-nano, trained by `phi3v recipe nano`; the menu's answer is {answer}: {verdict})")
        return 0
    out = Path(args.out)
    if not (out / "config.json").is_file():
        print(f"creating a small RANDOM-weight Phi-3.5-vision checkpoint in {out} (no model can be downloaded here)...",
              file=sys.stderr)
        create_random(reference_dir(DEMO_LIKE), out, DEMO_SIZES, seed=0, std=0.1)
    args.model = str(out)
    model = load_model(args)
    _ask(model, args.image or str(example_image()), args.prompt or "What does this chart show?", args.max_new_tokens)
    print("(random weights: the answer above is noise. A real checkpoint: phi3v chat --model DIR)")
    return 0
