"""phi3v's CUDA paths (bf16, int8, int4) beside transformers on one GPU, in one run: made to be run once inside a
short GPU lease. On one random-weight checkpoint shaped like Phi-3.5-mini (8 layers by default), it measures:
  1. correctness first: phi3v's float32 logits against transformers' on the device; each quantized width's
     layers against F.linear on their own dequantized weights, and which kernel each layer took;
  2. prefill and greedy decode throughput at each batch size, phi3v's engine (bf16, int8, int4) against
     transformers' model (bf16, SDPA, the same prompts and a plain greedy loop with its DynamicCache);
  3. a training step with bf16 autocast (float32 weights, AdamW), phi3v against transformers, tokens/s.
Prints one JSON line per measurement and a summary table; --json writes everything to a file as well.

    python benchmarks/cuda_bench.py [--like ../shared/reference/Phi-3.5-mini-instruct] [--layers 8]
        [--prompt-tokens 512] [--new-tokens 128] [--batches 1,8] [--train-batch 4] [--train-length 512]
        [--device cuda] [--json results.json]

`--device cpu --layers 1 --hidden 256 --heads 4 --intermediate 512 --prompt-tokens 16 --new-tokens 4` runs the same
code on a tiny model where no GPU is at hand (a check of the script, not a measurement; tests/test_cuda_bench.py).

On a lent GPU machine (the workplace's `device` tool) only the checkout travels, not ../shared: copy the config there
first, into a folder git ignores, and carry it (the machine's python3 has torch and transformers):
    echo /.dev/ >> .git/info/exclude; mkdir -p .dev; cp -r ../shared/reference/Phi-3.5-mini-instruct .dev/
    run: PHI3V_NATIVE=0 PYTHONUNBUFFERED=1 python3 benchmarks/cuda_bench.py --like .dev/Phi-3.5-mini-instruct \
             --json $OUT/cuda.json    (carry [".dev"], timeout_s 540; PHI3V_NATIVE=0: the CPU kernels, which no
             CUDA path runs, are not compiled there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout too (no install on a lent machine)
TEXT_LIKE = ROOT.parent / "shared" / "reference" / "Phi-3.5-mini-instruct"
WIDTHS = {"bf16": None, "int8": "int8", "int4": "int4"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """The last part's memory back (its model went with its function's frame) before the next part loads one."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def emit(results: list, record: dict) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)


def logits_check(path: Path, device: torch.device, results: list) -> None:
    """phi3v's and transformers' float32 logits for one prompt, on the device."""
    from transformers import AutoModelForCausalLM

    from phi3v.api import Phi3Model
    from phi3v.inference.bench import random_prompts

    ids = torch.tensor(random_prompts(1, 64, seed=1), device=device)
    ours = Phi3Model.load(path, dtype=torch.float32, device=str(device)).model.eval()
    with torch.no_grad():
        a = ours(ids).float()
    del ours
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    with torch.no_grad():
        b = ref(ids).logits.float()
    del ref
    diff = (a - b).abs().max().item()
    emit(results, {"check": "float32 logits, phi3v vs transformers", "max_abs_diff": diff,
                   "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(), "ok": diff < 1e-3})


def quantized_check(model, width: str, device: torch.device, results: list) -> None:
    """Every quantized layer against F.linear on its own dequantized weight (bf16 rows), and the kernels taken."""
    from phi3v.quant.layers import WeightOnlyInt4Linear, WeightOnlyInt8Linear, dequantize_int4

    worst, kinds, count = 0.0, {}, 0
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyInt8Linear):
            w = m.weight.float() * m.scales.float()[:, None]
            kind = "native" if m.native_packed is not None else "fbgemm" if m.packed is not None else "int8 x bf16"
        elif isinstance(m, WeightOnlyInt4Linear):
            w = dequantize_int4(m.weight, m.scales_and_zeros, m.group_size)
            kind = m.packed_for or "dequantized"
        else:
            continue
        for rows in (1, 8, 64):
            x = torch.randn(rows, m.in_features, generator=g).to(device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                got = m.matmul(x).float()
            ref = F.linear(x.float(), w.to(device))
            worst = max(worst, ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item())
        kinds[kind] = kinds.get(kind, 0) + 1
        count += 1
    # the int8 paths on CPU round the rows to 8 bits (~1e-2); bf16 rows through a bf16 kernel ~1e-2 at most
    emit(results, {"check": f"{width} layers vs their dequantized weights", "layers": count, "kernels": kinds,
                   "worst_relative_error": worst, "ok": count > 0 and worst < 3e-2})


def phi3v_inference(path: Path, width: str, args, device: torch.device, results: list) -> None:
    from phi3v.api import Phi3Model
    from phi3v.inference.bench import random_prompts, run_phi3v

    model = Phi3Model.load(path, dtype=torch.bfloat16, device=str(device), quantize=WIDTHS[width])
    if WIDTHS[width]:
        quantized_check(model.model, width, device, results)
    with torch.no_grad():
        run_phi3v(model, random_prompts(1, 16), 4)  # warm-up: kernels, allocator, autotuning
        for batch in args.batches:
            runs = []
            for _ in range(args.reps):
                sync(device)
                runs.append(run_phi3v(model, random_prompts(batch, args.prompt_tokens), args.new_tokens))
            emit(results, {"backend": "phi3v", "width": width, "batch": batch, **median_of(runs)})


def transformers_inference(path: Path, args, device: torch.device, results: list) -> None:
    """transformers' model on the same prompts: one batched prefill, then a plain greedy loop (its DynamicCache)."""
    from transformers import AutoModelForCausalLM

    from phi3v.inference.bench import random_prompts, transformers_workload

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device).eval()
    transformers_workload(model, random_prompts(1, 16), 4)  # warm-up
    for batch in args.batches:
        runs = [transformers_workload(model, random_prompts(batch, args.prompt_tokens), args.new_tokens)
                for _ in range(args.reps)]
        emit(results, {"backend": "transformers", "width": "bf16", **median_of(runs)})


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def train_rate(step, args, device: torch.device) -> tuple[float, float]:
    """Tokens/s of `step` (2 warm-up steps, then args.train_steps timed) and its last loss."""
    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        loss = step()
    sync(device)
    return args.train_batch * args.train_length * args.train_steps / (time.perf_counter() - t0), loss


def train_ids(args, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 32000, (args.train_batch, args.train_length), generator=g).to(device)


def phi3v_training(path: Path, args, device: torch.device, results: list) -> None:
    """AdamW steps on float32 weights under bf16 autocast: phi3v's model and loss."""
    from phi3v.checkpoint.load import load_causal_lm
    from phi3v.data.collate import Batch
    from phi3v.models import load_config
    from phi3v.train.loop import autocast_context, make_optimizer
    from phi3v.train.losses import next_token_loss

    model = load_causal_lm(path, load_config(path), torch.float32, str(device)).train()
    opt = make_optimizer([{"name": "all", "params": list(model.parameters())}], 1e-4)
    ids = train_ids(args, device)
    batch = Batch(ids, ids.clone(), torch.ones_like(ids, dtype=torch.bool))

    def step():
        with autocast_context(device, torch.bfloat16):
            out = next_token_loss(model, batch)
        (out.total / out.units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.total.item() / out.units

    rate, loss = train_rate(step, args, device)
    emit(results, {"backend": "phi3v", "train": "bf16 autocast", "tok_s": rate, "loss": loss})


def transformers_training(path: Path, args, device: torch.device, results: list) -> None:
    """The same steps through transformers' model, its loss and torch's AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = train_ids(args, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    rate, loss = train_rate(step, args, device)
    emit(results, {"backend": "transformers", "train": "bf16 autocast", "tok_s": rate, "loss": loss})


def summary(results: list) -> None:
    inf = {(r["backend"], r["width"], r["batch"]): r for r in results if "backend" in r and "width" in r}
    print("\nwidth  batch   phi3v prefill / decode tok/s   transformers bf16 prefill / decode   ratio")
    for (backend, width, batch), r in sorted(inf.items()):
        base = inf.get(("transformers", "bf16", batch))
        if backend != "phi3v" or base is None:
            continue
        print(f"{width:5} {batch:6}   {r['prefill_tok_s']:10.0f} / {r['decode_tok_s']:8.1f}"
              f"   {base['prefill_tok_s']:14.0f} / {base['decode_tok_s']:8.1f}"
              f"   {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x / {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
    train = {r["backend"]: r["tok_s"] for r in results if "train" in r}
    if len(train) == 2:
        ours, theirs = train["phi3v"], train["transformers"]
        print(f"training (bf16 autocast): phi3v {ours:.0f} tok/s, transformers {theirs:.0f} tok/s: "
              f"{ours / theirs:.2f}x")
    bad = [r["check"] for r in results if r.get("ok") is False]
    print("checks: " + ("all passed" if not bad else "FAILED: " + "; ".join(bad)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default=str(TEXT_LIKE), help="config (folder or config.json) the checkpoint copies")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-length", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: logits,inference,train")
    ap.add_argument("--json", help="also write every record to this file")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a check of the script", file=sys.stderr)
        return 2
    from phi3v.checkpoint.random import create_random

    results: list = []
    about = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
             else "cpu", "layers": args.layers, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    emit(results, about)
    with tempfile.TemporaryDirectory(prefix="phi3v-cuda-bench-") as tmp:
        sizes = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden), ("heads", args.heads),
                                   ("intermediate", args.intermediate)) if v is not None}
        t0 = time.perf_counter()
        path = create_random(args.like, Path(tmp) / "model", dtype="bfloat16", **sizes)
        emit(results, {"checkpoint_s": time.perf_counter() - t0})
        parts = []
        if "logits" not in skip:
            parts.append(("float32 logits", lambda: logits_check(path, device, results)))
        if "inference" not in skip:
            parts += [(f"phi3v {w} inference", lambda w=w: phi3v_inference(path, w, args, device, results))
                      for w in WIDTHS]
            parts.append(("transformers inference", lambda: transformers_inference(path, args, device, results)))
        if "train" not in skip:
            parts += [("phi3v training", lambda: phi3v_training(path, args, device, results)),
                      ("transformers training", lambda: transformers_training(path, args, device, results))]
        for name, run in parts:  # one lease, one run: a part that fails is reported and the others still run
            try:
                run()
            except Exception as e:  # noqa: BLE001
                emit(results, {"check": f"{name} ran", "error": f"{type(e).__name__}: {e}"[:2000], "ok": False})
            free(device)
    summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
