"""`phi3v bench`: prefill and decode throughput, time to first token and peak memory of one fixed workload,
optionally beside transformers running the identical workload in the same process."""

from __future__ import annotations

import json

import torch

from ..checkpoint.load import parse_dtype
from ..errors import Phi3VError
from ..inference.bench import peak_rss_mib, random_prompts, run_phi3v, run_transformers
from .common import add_model_args, load_model

HELP = "measure prefill/decode speed, TTFT and memory"


def bench(args) -> dict:
    torch.manual_seed(0)
    model = load_model(args)
    prompts = random_prompts(args.batch, args.prompt_tokens)
    # warm-up of the same shapes (as llama-bench warms up with its full prompt): a first call of a shape pays for
    # oneDNN's kernel generation, about a third of a 128-token bf16 prefill of an 8-layer model on Zen 5
    run_phi3v(model, random_prompts(args.batch, args.prompt_tokens, seed=1), 2, compile=args.compile)
    ours = run_phi3v(model, prompts, args.new_tokens, args.image, compile=args.compile)
    ours["peak_rss_mib"] = peak_rss_mib()
    result = {"model": str(model.path), "dtype": str(next(model.model.parameters()).dtype).removeprefix("torch."),
              "quantize": args.quantize, "compile": args.compile, "threads": torch.get_num_threads(), "phi3v": ours}
    if args.baseline == "transformers":
        if model.is_vision or args.image:
            raise Phi3VError("--baseline transformers needs a text model (Phi-3-vision needs remote code there)")
        del model
        dtype = parse_dtype(result["dtype"])  # the dtype phi3v ran in ("auto" resolved)
        run_transformers(args.model, random_prompts(args.batch, args.prompt_tokens, seed=1), 2, dtype)  # warm-up
        base = run_transformers(args.model, prompts, args.new_tokens, dtype)
        result["transformers"] = base
        result["ratio"] = {k: ours[k] / base[k] for k in ("prefill_tok_s", "decode_tok_s")}
    return result


def report(result: dict) -> str:
    rows = [("phi3v", result["phi3v"])] + ([("transformers", result["transformers"])] if "transformers" in result else [])
    lines = [f"model {result['model']}  dtype {result['dtype']}  quantize {result['quantize']}  "
             f"threads {result['threads']}",
             f"{'':14}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT s':>9}"]
    for name, r in rows:
        lines.append(f"{name:14}{r['prefill_tok_s']:14.1f}{r['decode_tok_s']:14.2f}{r['ttft_s']:9.3f}")
    r = result["phi3v"]
    lines.append(f"batch {r['batch']}, {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens; "
                 f"peak RSS (phi3v) {r['peak_rss_mib']:.0f} MiB")
    if "ratio" in result:
        lines.append("phi3v / transformers: prefill {prefill_tok_s:.2f}x, decode {decode_tok_s:.2f}x".format(
            **result["ratio"]))
    return "\n".join(lines)


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--image", default=None, help="time an image prompt (vision models): TTFT includes the image")
    p.add_argument("--baseline", choices=["transformers"], default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    result = bench(args)
    print(json.dumps(result) if args.json else report(result))
    return 0
