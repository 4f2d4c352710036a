"""What several commands share: the model arguments (one definition, one default), sampling arguments, loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Phi3VError
from ..quant import SCHEMES

RANDOM_NOTE = "note: {path} has RANDOM weights (made by `phi3v create-random`): its output is meaningless text.\n"


def add_model_args(p: argparse.ArgumentParser, quantize: bool = True, dtype: str = "auto") -> None:
    """--model, --dtype, --device and (where a command can quantize at load time) --quantize."""
    p.add_argument("--model", default=None,
                   help="checkpoint folder or a Hugging Face repo id (default: the bundled phi3v-nano)")
    p.add_argument("--dtype", default=dtype, help="float32, bfloat16, float16 or auto (bfloat16 where it is fast)")
    p.add_argument("--device", default="cpu")
    if quantize:
        p.add_argument("--quantize", choices=SCHEMES, default=None, help="weight-only quantization at load time")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors, from phi3v train)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", help="image file (repeatable; Phi-3(.5)-vision models)")
    p.add_argument("--num-crops", type=int, default=None, help="HD crops per image (default: preprocessor_config)")
    p.add_argument("--max-context", type=int, default=None, help="token budget of prompt + answer")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop or [], repetition_penalty=args.repetition_penalty)


def load_model(args):
    """phi3v.load with the model arguments; says so on stderr when the weights are random."""
    from ..api import load

    if getattr(args, "adapter", None):
        from ..train.lora import read_adapter

        read_adapter(args.adapter)  # a bad adapter folder is refused before the model is loaded
    model = load(args.model, dtype=args.dtype, device=args.device, quantize=getattr(args, "quantize", None))
    if model.is_random:
        sys.stderr.write(RANDOM_NOTE.format(path=model.path))
    if getattr(args, "adapter", None):
        from ..train.lora import load_adapter

        # merged into the float weights (no adapter matmuls at inference); quantized layers keep theirs unmerged
        load_adapter(model.model, args.adapter, merge=True)
    return model


def reference_dir(name: str) -> Path:
    """A reference config folder by name, looked up in ../shared/reference beside the repo (for a dev checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        for cand in (base / "shared" / "reference" / name, base.parent / "shared" / "reference" / name):
            if cand.is_dir():
                return cand
    raise Phi3VError(f"cannot find the reference config {name!r}; pass --like with a config.json or model folder")
