"""Measurements behind `phi3v bench`: prefill and decode throughput, time to first token and peak memory of one
fixed workload, on phi3v's engine or on transformers' model running the identical workload."""

from __future__ import annotations

import resource
import time

import torch

from .engine import Engine
from .requests import Prompt
from .sampling import SamplingParams

FIRST_PLAIN_TOKEN = 100  # random prompts avoid the byte-fallback and special tokens at both ends of the vocab


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PLAIN_TOKEN, 32000, (batch, length), generator=g).tolist()


def run_phi3v(model, prompts: list[list[int]], new_tokens: int, image=None, prefill_chunk: int | None = None,
              compile: bool = False) -> dict:
    """One workload on a fresh engine: all prompts prefilled in one batch, then greedy decode to new_tokens.
    `model` is a loaded phi3v.api.Phi3Model."""
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
    from transformers import AutoModelForCausalLM

    return transformers_workload(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), prompts, new_tokens)


def transformers_workload(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """run_transformers' workload on a loaded transformers model, on the model's device (synchronized around each
    timed part where that is a GPU)."""
    from transformers import DynamicCache

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
    B, P = ids.shape
    return {"batch": B, "prompt_tokens": P, "new_tokens": new_tokens, "prefill_tok_s": B * P / (t1 - t0),
            "decode_tok_s": B * (new_tokens - 1) / (t2 - t1), "ttft_s": t1 - t0}
