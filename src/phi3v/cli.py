"""The `phi3v` command: generate, chat, create-random, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import Phi3VError

RANDOM_NOTE = "note: {path} has RANDOM weights (made by `phi3v create-random`): its output is meaningless text.\n"
DEMO_LIKE = "Phi-3.5-vision-instruct"


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop or [], repetition_penalty=args.repetition_penalty)


def _load(args):
    from .api import load

    model = load(args.model, dtype=args.dtype, device=args.device, quantize=getattr(args, "quantize", None))
    if model.is_random:
        sys.stderr.write(RANDOM_NOTE.format(path=model.path))
    return model


def cmd_generate(args) -> None:
    model = _load(args)
    sampling = dict(_sampling(args), images=args.image or None, num_crops=args.num_crops, max_context=args.max_context)
    if args.json:
        out = model.generate(args.prompt, system=args.system, raw=args.raw, **sampling)
        print(json.dumps(out.to_dict(), ensure_ascii=False))
        return
    for delta in model.stream(args.prompt, system=args.system, raw=args.raw, **sampling):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    model = _load(args)
    sampling = _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = list(args.image or [])
    print("phi3v chat: type a message; /image PATH attaches an image to your next message, /reset starts over, "
          "/exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            messages, pending = (messages[:1] if args.system else []), []
            continue
        if cmd.startswith("/image"):
            path = cmd[len("/image"):].strip()
            try:
                _check_image(model, path)
            except Phi3VError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(image {path} will go with your next message)", file=sys.stderr)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line, **({"images": pending} if pending else {})})
        pending = []
        sys.stdout.write("assistant> ")
        reply = []
        try:
            for delta in model.chat_stream(messages, num_crops=args.num_crops, max_context=args.max_context,
                                           **sampling):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except Phi3VError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _check_image(model, path: str) -> None:
    from .image_processing import load_image

    if not model.is_vision:
        raise Phi3VError(f"{model.path} is a text model: it cannot take images")
    load_image(path, model.processor.max_pixels)


def _reference_dir(name: str) -> Path:
    """A reference config folder by name, looked up in ../shared/reference beside the repo (for a dev checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        for cand in (base / "shared" / "reference" / name, base.parent / "shared" / "reference" / name):
            if cand.is_dir():
                return cand
    raise Phi3VError(f"cannot find the reference config {name!r}; pass --like with a config.json or model folder")


def cmd_create_random(args) -> None:
    from .random_checkpoint import create_random

    like = Path(args.like) if Path(args.like).exists() else _reference_dir(args.like)
    out = create_random(like, args.out, seed=args.seed, std=args.std, dtype=args.dtype, layers=args.layers,
                        hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                        intermediate=args.intermediate, experts=args.experts, original_max=args.original_max,
                        sliding_window=args.sliding_window, vision_layers=args.vision_layers,
                        vision_hidden=args.vision_hidden, vision_heads=args.vision_heads,
                        vision_intermediate=args.vision_intermediate)
    print(f"wrote a RANDOM-weight checkpoint shaped like {like} to {out}")


def cmd_demo(args) -> None:
    """The Quick start job: make a small random Phi-3.5-vision checkpoint if needed and ask it about an image."""
    from .examples import example_image
    from .random_checkpoint import create_random

    out = Path(args.out)
    if not (out / "config.json").is_file():
        print(f"creating a small RANDOM-weight Phi-3.5-vision checkpoint in {out} (no model can be downloaded here)...",
              file=sys.stderr)
        create_random(_reference_dir(DEMO_LIKE), out, seed=0, std=0.1, layers=4, hidden=256, heads=8,
                      intermediate=512)
    args.model, args.dtype, args.device = str(out), "float32", "cpu"
    model = _load(args)
    image = args.image or str(example_image())
    print(f"image> {image}\nuser> {args.prompt}\nassistant> ", end="", flush=True)
    for delta in model.stream(args.prompt, images=[image], max_new_tokens=args.max_new_tokens):
        sys.stdout.write(delta)
        sys.stdout.flush()
    print("\n(random weights: the answer above is noise. A real checkpoint: phi3v chat --model DIR)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or a repo id in the local HF cache")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization at load time")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", help="image file (repeatable; Phi-3(.5)-vision models)")
    p.add_argument("--num-crops", type=int, default=None, help="HD crops per image (default: preprocessor_config)")
    p.add_argument("--max-context", type=int, default=None, help="token budget of prompt + answer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3v", description="Run Microsoft's Phi-3 family locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "prompt_tokens", "finish_reason"}')
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming")
    _add_model(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("create-random", help="write a random-weight checkpoint in the real layout")
    p.add_argument("--like", required=True, help="config.json or model folder (or a name in shared/reference)")
    p.add_argument("--out", required=True)
    for flag in ("layers", "hidden", "heads", "kv-heads", "intermediate", "experts", "original-max",
                 "sliding-window"):
        p.add_argument(f"--{flag}", type=int, default=None)
    for flag in ("vision-layers", "vision-hidden", "vision-heads", "vision-intermediate"):
        p.add_argument(f"--{flag}", type=int, default=None,
                       help="CLIP size (Phi-3-vision only); default: a 64-wide 3-layer CLIP when the decoder is resized")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(func=cmd_create_random)

    from . import bench, quantize, server

    bench.register(sub)
    quantize.register(sub)
    server.register(sub)

    p = sub.add_parser("demo", help="the Quick start: a random checkpoint and a first generation")
    p.add_argument("--out", default="checkpoints/random-phi3.5-vision")
    p.add_argument("--image", default=None, help="default: the bundled example chart")
    p.add_argument("--prompt", default="What does this chart show?")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Phi3VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
