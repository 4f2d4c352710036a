"""`phi3v bench`: prefill and decode throughput, time to first token and peak memory of one fixed workload,
optionally beside transformers running the identical workload in the same process."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from .errors import Phi3VError
from .generate import Prompt
from .sampling import SamplingParams

FIRST_PLAIN_TOKEN = 100  # random prompts avoid the byte-fallback and special tokens at both ends of the vocab


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PLAIN_TOKEN, 32000, (batch, length), generator=g).tolist()


def run_phi3v(model, prompts: list[list[int]], new_tokens: int, image=None, prefill_chunk: int | None = None,
              compile: bool = False) -> dict:
    """One workload on a fresh engine: all prompts prefilled in one batch, then greedy decode to new_tokens."""
    from .engine import Engine

    P = max(len(p) for p in prompts)
    t0 = time.perf_counter()
    if image is not None:  # time to first token includes image processing and the vision tower
        text_prompts = [model.prepare("Describe the image.", images=[image])]
        P = len(text_prompts[0].ids)
        prepared = text_prompts * len(prompts)
    else:
        prepared = [Prompt(p) for p in prompts]
    engine = Engine(model.model, max_batch=len(prompts), max_context=P + new_tokens,
                    prefill_chunk=prefill_chunk or P, recompute_on_long_switch=model.recompute_on_long_switch,
                    compile=compile)
    for p in prepared:
        engine.add(p, SamplingParams(max_new_tokens=new_tokens))
    first = None
    while engine.has_work():
        engine.step()
        if first is None:  # the first step also ran one decode step: that is not part of the first token
            first = time.perf_counter() - t0 - engine.stats.decode_s
    st = engine.stats
    return {
        "batch": len(prompts), "prompt_tokens": P, "new_tokens": new_tokens,
        "prefill_tok_s": st.prefill_tokens / st.prefill_s,
        "decode_tok_s": st.decode_tokens / st.decode_s,
        "ttft_s": first,
    }


def run_transformers(path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> dict:
    """The same workload through transformers' model: one batched prefill, then a greedy decode loop."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    B, P = ids.shape
    return {"batch": B, "prompt_tokens": P, "new_tokens": new_tokens, "prefill_tok_s": B * P / (t1 - t0),
            "decode_tok_s": B * (new_tokens - 1) / (t2 - t1), "ttft_s": t1 - t0}


def bench(args) -> dict:
    from .api import load

    torch.manual_seed(0)
    model = load(args.model, dtype=args.dtype, quantize=args.quantize)
    prompts = random_prompts(args.batch, args.prompt_tokens)
    run_phi3v(model, random_prompts(args.batch, 8, seed=1), 4, prefill_chunk=8, compile=args.compile)  # warm-up
    ours = run_phi3v(model, prompts, args.new_tokens, args.image, compile=args.compile)
    ours["peak_rss_mib"] = peak_rss_mib()
    result = {"model": str(model.path), "dtype": str(next(model.model.parameters()).dtype).removeprefix("torch."),
              "quantize": args.quantize, "compile": args.compile, "threads": torch.get_num_threads(), "phi3v": ours}
    if args.baseline == "transformers":
        if model.is_vision or args.image:
            raise Phi3VError("--baseline transformers needs a text model (Phi-3-vision needs remote code there)")
        del model
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype, torch.float32)
        run_transformers(args.model, random_prompts(args.batch, 8, seed=1), 4, dtype)  # warm-up
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


def cmd_bench(args) -> None:
    result = bench(args)
    print(json.dumps(result) if args.json else report(result))


def register(sub) -> None:
    p: argparse.ArgumentParser = sub.add_parser("bench", help="measure prefill/decode speed, TTFT and memory")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--image", default=None, help="time an image prompt (vision models): TTFT includes the image")
    p.add_argument("--baseline", choices=["transformers"], default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    sys.exit(print("use: phi3v bench ..."))
