"""`phi3v chat`: interactive, multi-turn, streaming; /image PATH attaches an image, /reset, /exit."""

from __future__ import annotations

import sys

from ..errors import Phi3VError
from ..processing.image import load_image
from .common import add_model_args, add_prompt_args, add_sampling_args, load_model, sampling

HELP = "interactive multi-turn chat with streaming"


def add_arguments(p) -> None:
    add_model_args(p)
    add_prompt_args(p)
    add_sampling_args(p)


def _check_image(model, path: str) -> None:
    if not model.is_vision:
        raise Phi3VError(f"{model.path} is a text model: it cannot take images")
    load_image(path, model.processor.max_pixels)


def run(args) -> int:
    model = load_model(args)
    kw = sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = list(args.image or [])
    print("phi3v chat: type a message; /image PATH attaches an image to your next message, /reset starts over, "
          "/exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
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
            for delta in model.chat_stream(messages, num_crops=args.num_crops, max_context=args.max_context, **kw):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except Phi3VError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
