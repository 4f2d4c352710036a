"""`phi3v generate`: complete one prompt (streamed, or as one JSON object)."""

from __future__ import annotations

import json
import sys

from .common import add_model_args, add_prompt_args, add_sampling_args, load_model, sampling

HELP = "complete one prompt"


def add_arguments(p) -> None:
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "prompt_tokens", "finish_reason"}')
    add_sampling_args(p)


def run(args) -> int:
    model = load_model(args)
    kw = dict(sampling(args), images=args.image or None, num_crops=args.num_crops, max_context=args.max_context)
    if args.json:
        out = model.generate(args.prompt, system=args.system, raw=args.raw, **kw)
        print(json.dumps(out.to_dict(), ensure_ascii=False))
        return 0
    for delta in model.stream(args.prompt, system=args.system, raw=args.raw, **kw):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
