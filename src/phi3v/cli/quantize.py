"""`phi3v quantize`: write a weight-only int8/int4 copy of a checkpoint (config.json records the scheme)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.hub import resolve_model_dir
from ..checkpoint.quantized import quantize_checkpoint
from ..checkpoint.safetensors import weight_files
from ..quant import GROUP_SIZES, SCHEMES

HELP = "write a weight-only int8/int4 copy of a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="float checkpoint folder (or a repo id in the local HF cache)")
    p.add_argument("--out", required=True, help="folder for the quantized checkpoint")
    p.add_argument("--scheme", choices=SCHEMES, default="int8")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=128, help="int4 only")
    p.add_argument("--no-vision", action="store_true", help="keep the CLIP tower and img_projection in float")
    p.add_argument("--dtype", default="bfloat16", help="dtype of scales, biases and unquantized weights")


def run(args) -> int:
    spec = quantize_checkpoint(args.model, args.out, args.scheme, args.group_size, not args.no_vision, args.dtype)
    dirs = (resolve_model_dir(args.model), Path(args.out))
    before, after = (sum(f.stat().st_size for f in weight_files(d)) for d in dirs)
    group = f", group size {spec['group_size']}" if spec["group_size"] else ""
    print(f"wrote a weight-only {spec['scheme']}{group} checkpoint to {args.out}: weights "
          f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.2f}x)")
    if spec["skipped"]:
        print(f"left in {args.dtype} ({len(spec['skipped'])} layers whose shape the kernels cannot take): "
              + ", ".join(spec["skipped"]))
    return 0
