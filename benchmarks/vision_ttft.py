"""Time to first token of one image prompt: phi3v (auto dtype, and --quantize int8) beside the transformers
reference-equivalent (its CLIPVisionModel on the same crops + Phi3ForCausalLM prefill of the same number of
embeddings, float32, SDPA), with the split into image (processing + CLIP + projector) and decoder prefill.
Every repetition runs each variant once, in a fresh process, in turn (interleaved); medians and ratios at the end.

    python benchmarks/vision_ttft.py --model V8 [--reps 3] [--threads 2] [--size 800x600] [--num-crops 4]

V8: `phi3v create-random --like ../shared/reference/Phi-3.5-vision-instruct --layers 8 --vision-layers 24
--vision-hidden 1024 --vision-heads 16 --vision-intermediate 4096 --vision-image-size 336 --vision-patch-size 14`
(an 8-layer decoder and the full CLIP ViT-L/14-336).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("phi3v", "phi3v-int8", "transformers-fp32")
PROMPT = "Describe the image."


def make_image(size: str):
    import numpy as np
    from PIL import Image

    w, h = map(int, size.split("x"))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def run_phi3v(model_dir: str, size: str, num_crops: int, quantize: str | None) -> dict:
    import torch

    from phi3v.api import Phi3Model
    from phi3v.inference.engine import Engine
    from phi3v.inference.sampling import SamplingParams

    model = Phi3Model.load(model_dir, quantize=quantize)
    image = make_image(size)
    with torch.no_grad():
        model.prepare(PROMPT, images=[make_image("64x48")], num_crops=1)  # warm-up (a small image: 1 crop)
        model._features.clear()  # prepare() caches features per image: this run must compute them
        t0 = time.perf_counter()
        prompt = model.prepare(PROMPT, images=[image], num_crops=num_crops)
        t1 = time.perf_counter()
        engine = Engine(model.model, max_batch=1, max_context=len(prompt.ids) + 1, prefill_chunk=len(prompt.ids),
                        recompute_on_long_switch=model.recompute_on_long_switch)
        engine.add(prompt, SamplingParams(max_new_tokens=1))
        while engine.has_work():
            engine.step()
        t2 = time.perf_counter()
    dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
    return {"tokens": len(prompt.ids), "image_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0, "dtype": dtype}


def run_transformers(model_dir: str, size: str, num_crops: int, tokens: int) -> dict:
    """transformers' CLIPVisionModel (hidden_states[-2]) on the crops phi3v's processor makes, then
    Phi3ForCausalLM's prefill of `tokens` embeddings; random weights of the checkpoint's shapes, float32, SDPA
    (without LongRoPE's factors: the same work below original_max_position_embeddings)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from phi3v.processing.image import ImageProcessor

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    v = raw["img_processor"]["vision_config"]
    vcfg = CLIPVisionConfig(**{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                                 "layer_norm_eps", "projection_dim") if k in v},
                            attn_implementation="sdpa")
    text = {k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                "rope_theta", "rms_norm_eps",
                                "sliding_window") if k in raw}
    torch.manual_seed(0)
    clip = CLIPVisionModel(vcfg).eval()
    lm = Phi3ForCausalLM(Phi3Config(**text, attn_implementation="sdpa")).eval()
    proc = ImageProcessor.from_dir(model_dir)
    with torch.no_grad():
        clip(torch.zeros(1, 3, vcfg.image_size, vcfg.image_size), output_hidden_states=True)  # warm-up
        lm(inputs_embeds=torch.zeros(1, 8, lm.config.hidden_size), logits_to_keep=1)
        t0 = time.perf_counter()
        out = proc([make_image(size)], num_crops=num_crops)
        n = 1 + (out["image_sizes"][0, 0] // vcfg.image_size) * (out["image_sizes"][0, 1] // vcfg.image_size)
        clip(out["pixel_values"][0, :int(n)], output_hidden_states=True).hidden_states[-2][:, 1:]
        t1 = time.perf_counter()  # (the reference's 2x2 merge and projector are small next to CLIP and left out)
        lm(inputs_embeds=torch.randn(1, tokens, lm.config.hidden_size) * 0.02, logits_to_keep=1)
        t2 = time.perf_counter()
    return {"tokens": tokens, "image_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0, "dtype": "float32",
            "crops": int(n)}


def worker(args) -> int:
    if args.worker == "transformers-fp32":
        r = run_transformers(args.model, args.size, args.num_crops, args.tokens)
    else:
        r = run_phi3v(args.model, args.size, args.num_crops, "int8" if args.worker == "phi3v-int8" else None)
    print(json.dumps(r))
    return 0


def spawn(args, variant: str, tokens: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--model", args.model, "--size", args.size, "--num-crops", str(args.num_crops),
           "--worker", variant, "--tokens", str(tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Phi-3(.5)-vision checkpoint folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="800x600", help="the image, WxH (random pixels)")
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_bench import cpu_summary

    print(f"CPU: {cpu_summary()}\n{args.size} image, num_crops {args.num_crops}, {args.threads} threads, "
          f"{args.reps} interleaved repetitions", flush=True)
    runs = {v: [] for v in VARIANTS}
    tokens = 0
    for rep in range(args.reps):
        for v in VARIANTS:
            runs[v].append(spawn(args, v, tokens))
            tokens = tokens or runs[v][-1]["tokens"]  # the reference prefills as many embeddings as phi3v's prompt
            print(f"  rep {rep + 1} {v}: " + ", ".join(f"{k} {x:.2f}" if isinstance(x, float) else f"{k} {x}"
                                                      for k, x in runs[v][-1].items()), flush=True)
    med = {v: {k: median([r[k] for r in runs[v]]) for k in ("image_s", "prefill_s", "ttft_s")} for v in VARIANTS}
    base = med["transformers-fp32"]["ttft_s"]
    print(f"{tokens}-token prompt; medians:")
    print(f"{'variant':20}{'dtype':>10}{'image s':>9}{'prefill s':>11}{'TTFT s':>9}{'/ reference':>13}")
    for v in VARIANTS:
        m = med[v]
        print(f"{v:20}{runs[v][0]['dtype']:>10}{m['image_s']:>9.2f}{m['prefill_s']:>11.2f}{m['ttft_s']:>9.2f}"
              f"{m['ttft_s'] / base:>12.2f}x")
    print(f"int8 / unquantized phi3v TTFT: {med['phi3v-int8']['ttft_s'] / med['phi3v']['ttft_s']:.2f}x")
    print(json.dumps({"cpu": cpu_summary(), "tokens": tokens, "median": med, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
