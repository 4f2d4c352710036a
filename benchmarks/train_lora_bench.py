"""LoRA training throughput of phi3v beside transformers + peft on the same tiny text model, batch, length and rank.

Each backend runs in its own child process (its own peak RSS), in --rounds alternating rounds (medians count):
    python benchmarks/train_lora_bench.py [--model DIR] [--batch 4] [--length 256] [--steps 10] [--rounds 3]
        [--r 16] [--alpha 32] [--device cpu] [--backends phi3v-lora,peft-lora,phi3v-qlora-int8,phi3v-qlora-int4]
Prints one JSON line per backend (median tokens/s, samples/s, peak RSS MiB, trainable parameters, final loss) and the
phi3v / peft ratios. Both adapt qkv_proj, o_proj, gate_up_proj and down_proj of every layer; QLoRA has no peft
counterpart here (bitsandbytes is CUDA-only), so it is listed without a ratio. Needs `pip install peft`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_bench import TEXT_LIKE, batch_ids  # the same model shape and batch as the full fine-tuning benchmark

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def phi3v_step(args, qlora: str | None = None):
    from phi3v.checkpoint.load import load_causal_lm
    from phi3v.data.collate import Batch
    from phi3v.models import load_config
    from phi3v.quant.layers import quantize_model
    from phi3v.train.lora import apply_lora
    from phi3v.train.loop import make_optimizer
    from phi3v.train.losses import next_token_loss

    model = load_causal_lm(Path(args.model), load_config(args.model), torch.float32, args.device).train()
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    if qlora:  # only the adapted layers, as the recipe's --qlora does
        others = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(names)
        quantize_model(model, qlora, 64, skip=others)
    apply_lora(model, names, args.r, args.alpha, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer([{"name": "lora", "params": params}], 1e-4)
    ids = batch_ids(args).to(args.device)
    batch = Batch(ids, ids.clone(), torch.ones_like(ids, dtype=torch.bool))

    def step():
        out = next_token_loss(model, batch)
        (out.total / out.units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.total.item() / out.units
    return step, sum(p.numel() for p in params)


def peft_step(args):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(args.device)
    config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = batch_ids(args).to(args.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in params)


BACKENDS = {"phi3v-lora": phi3v_step, "peft-lora": peft_step,
            "phi3v-qlora-int8": lambda a: phi3v_step(a, "int8"), "phi3v-qlora-int4": lambda a: phi3v_step(a, "int4")}


def measure(args) -> dict:
    step, trainable = BACKENDS[args.backend](args)
    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n = args.steps * args.batch
    return {"backend": args.backend, "tokens_per_s": n * args.length / elapsed, "samples_per_s": n / elapsed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "trainable_params": trainable,
            "final_loss": loss, "batch": args.batch, "length": args.length, "r": args.r, "steps": args.steps,
            "device": args.device, "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="text checkpoint folder (default: a random tiny Phi-3.5-mini)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of every backend; medians are reported")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.backend:
        print(json.dumps(measure(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from phi3v.checkpoint.random import create_random

            args.model = str(create_random(TEXT_LIKE, tmp, seed=0, layers=4, hidden=256, heads=8, intermediate=512,
                                           dtype="float32"))
        runs: dict[str, list[dict]] = {}
        names = args.backends.split(",")
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                child = [sys.executable, __file__, "--backend", name, "--model", args.model, "--batch", str(args.batch),
                         "--length", str(args.length), "--steps", str(args.steps), "--warmup", str(args.warmup),
                         "--r", str(args.r), "--alpha", str(args.alpha), "--device", args.device]
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        results = {}
        for name, rs in runs.items():
            rs = sorted(rs, key=lambda x: x["tokens_per_s"])
            results[name] = {**rs[len(rs) // 2], "rounds": len(rs), "tokens_per_s_all": [x["tokens_per_s"] for x in rs]}
            print(json.dumps(results[name]))
    if "phi3v-lora" in results and "peft-lora" in results:
        a, b = results["phi3v-lora"], results["peft-lora"]
        print(json.dumps({"phi3v/peft tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                          "phi3v/peft peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
                          "same trainable params": a["trainable_params"] == b["trainable_params"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
