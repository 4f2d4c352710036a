"""Quality of weight-only quantization against the unquantized bf16 model: top-1 agreement and mean KL(bf16 || quant)
at the last prompt position and over all positions of a fixed prompt set.

Models: the fixture tiny Phi-3-vision / Phi-3.5-vision (text prompts plus one fixture case with its image(s)) and a
random 8-layer Phi-3.5-mini-shaped model (`create_random`, std 0.02, ~1.1B parameters, written to a temp folder).
The "float32" row is the unquantized model in float32 against the same bf16 reference: the rounding noise floor.

    python benchmarks/quant_quality.py [--skip-mini]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.models import config_from_dict
from phi3v.processing.image import ImageProcessor
from phi3v.processing.prompts import tokenize_with_images
from phi3v.processing.tokenizer import Tokenizer
from phi3v.quant.layers import quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "phi3v"
PHI35_MINI = SHARED / "reference" / "Phi-3.5-mini-instruct"
VISION_MODELS = {"phi3_vision_tiny": "A1_landscape_640x480", "phi35_vision_tiny": "B1_single_800x600"}
TEXT_PROMPTS = [
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers and say what makes a number prime.",
    "Translate 'good morning, how are you?' into French and German.",
]
# (label, scheme or None for the float32 row, kwargs of quantize_model)
VARIANTS = [
    ("float32", None, {}),
    ("int8", "int8", {}),
    ("int8 text-only", "int8", {"include_vision": False}),
    ("int4 g32", "int4", {"group_size": 32}),
    ("int4 g128", "int4", {"group_size": 128}),
]


def load(model_dir: Path, dtype: torch.dtype):
    raw = json.loads((model_dir / "config.json").read_text())
    return load_causal_lm(model_dir, config_from_dict(raw), dtype, raw=raw)


def prompts_for(model_dir: Path, case: str | None) -> list[dict]:
    """Token ids (and images) of the prompt set: the text prompts, plus the fixture case's prompt and image(s)."""
    tok = Tokenizer.from_dir(model_dir)
    out = [{"ids": tok.apply_chat_template([{"role": "user", "content": p}])} for p in TEXT_PROMPTS]
    if case is not None:
        d = model_dir / case
        manifest = json.loads((d / "manifest.json").read_text())
        images = [Image.open(d / im["file"]) for im in manifest["images"]]
        processed = ImageProcessor.from_dir(model_dir)(images, num_crops=manifest["num_crops"])
        ids = tokenize_with_images(tok, manifest["prompt"], processed["num_img_tokens"])
        out.append({"ids": ids, "pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]})
    return out


@torch.no_grad()
def all_logits(model, prompts: list[dict], dtype: torch.dtype) -> list[torch.Tensor]:
    """Float32 logits (T, V) at every position of each prompt, one prompt per forward."""
    out = []
    for p in prompts:
        ids = torch.tensor([p["ids"]])
        if "pixel_values" in p:
            x = model.embed(ids, p["pixel_values"], p["image_sizes"]).to(dtype)
            out.append(model(inputs_embeds=x)[0].float())
        else:
            out.append(model(ids)[0].float())
    return out


def kl(ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) per row of logits."""
    lp, lq = ref.log_softmax(-1), q.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    last_r, last_q = torch.stack([r[-1] for r in ref]), torch.stack([g[-1] for g in got])
    all_r, all_q = torch.cat(ref), torch.cat(got)
    return {"top1_last": (last_r.argmax(-1) == last_q.argmax(-1)).float().mean().item(),
            "top1_all": (all_r.argmax(-1) == all_q.argmax(-1)).float().mean().item(),
            "kl_last": kl(last_r, last_q).mean().item(), "kl_all": kl(all_r, all_q).mean().item()}


def evaluate(name: str, model_dir: Path, case: str | None, variants=VARIANTS) -> None:
    prompts = prompts_for(model_dir, case)
    n_pos = sum(len(p["ids"]) for p in prompts)
    ref = all_logits(load(model_dir, torch.bfloat16), prompts, torch.bfloat16)
    top2 = torch.cat(ref).topk(2, -1).values
    print(f"\n{name}: {len(prompts)} prompts ({'with ' + case + ' image(s), ' if case else ''}{n_pos} positions), "
          f"reference = unquantized bf16 (median top-1/top-2 logit gap {(top2[:, 0] - top2[:, 1]).median():.3f}, "
          f"logit std {torch.cat(ref).std():.2f})")
    print(f"  {'variant':<16}{'skipped':>8}{'top1 last':>11}{'top1 all':>10}{'KL last':>10}{'KL all':>10}{'s':>7}")
    for label, scheme, kw in variants:
        if scheme is not None and "include_vision" in kw and case is None:
            continue  # text-only model: the same as the row above
        t0 = time.perf_counter()
        dtype = torch.float32 if scheme is None else torch.bfloat16
        model = load(model_dir, dtype)
        spec = quantize_model(model, scheme, **kw) if scheme else {"skipped": []}
        r = compare(ref, all_logits(model, prompts, dtype))
        del model
        print(f"  {label:<16}{len(spec['skipped']):>8}{r['top1_last']:>11.3f}{r['top1_all']:>10.4f}"
              f"{r['kl_last']:>10.5f}{r['kl_all']:>10.5f}{time.perf_counter() - t0:>7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-mini", action="store_true", help="only the tiny fixture models")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for name, case in VISION_MODELS.items():
        evaluate(name, FIXTURES / name, case)
    if not args.skip_mini:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            d = create_random(PHI35_MINI, Path(tmp) / "mini8", layers=8, std=0.02)
            print(f"\n(created the random 8-layer Phi-3.5-mini-shaped checkpoint in {time.perf_counter() - t0:.0f} s)")
            evaluate("random Phi-3.5-mini, 8 layers", d, None)


if __name__ == "__main__":
    main()
