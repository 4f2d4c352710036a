"""Parity of the text decoders with transformers' Phi3ForCausalLM / PhimoeForCausalLM in float32.

The tiny models are cut from the real configs with the features most likely to be wrong switched on:
LongRoPE with original_max_position_embeddings=64 (so prompts and generations cross it), a sliding window
of 16, grouped-query attention, and Phi-3.5-MoE's 16-expert sparsemixer router with mscale.
"""

from __future__ import annotations

import pytest
import torch

from phi3v.models import load_config
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.checkpoint.load import load_causal_lm
from phi3v.inference.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
ATOL = RTOL = 1e-4


def fix_phimoe_longrope(monkeypatch):
    """transformers 5.23's PhimoeRotaryEmbedding never uses long_factor (it rebuilds inv_freq without seq_len)
    while Microsoft's modeling_phimoe.py switches to it past original_max_position_embeddings. Patch the
    reference to switch the way Microsoft's code does, so the comparison covers the long factors too."""
    from transformers.models.phimoe import modeling_phimoe as pm

    def forward(self, x, position_ids=None):
        seq_len = int(position_ids.max()) + 1
        rp = self.config.rope_parameters
        mscale = rp["long_mscale"] if seq_len > rp["original_max_position_embeddings"] else rp["short_mscale"]
        inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len=seq_len)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    monkeypatch.setattr(pm.PhimoeRotaryEmbedding, "forward", forward)


def load_pair(path, monkeypatch):
    ours = load_causal_lm(path, load_config(path), torch.float32)
    cls = transformers.AutoModelForCausalLM
    ref = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if ref.config.model_type == "phimoe":
        fix_phimoe_longrope(monkeypatch)
    return ours, ref


@pytest.fixture(params=["tiny_phi3", "tiny_moe"])
def pair(request, monkeypatch):
    return load_pair(request.getfixturevalue(request.param), monkeypatch)


@pytest.mark.parametrize("length", [40, 64, 65, 140])  # short factors, the boundary, just past it, long
def test_logits_match_reference(pair, random_ids, length):
    ours, ref = pair
    ids = random_ids[:1, :length]
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_batch_rows_match_reference(pair, random_ids):
    ours, ref = pair
    with torch.no_grad():
        a, b = ours(random_ids[:, :50]), ref(random_ids[:, :50]).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_transformers_phimoe_long_factor_bug_is_real(tiny_moe, random_ids):
    """Documents why the MoE reference is patched: unpatched transformers differs only past the boundary."""
    ours = load_causal_lm(tiny_moe, load_config(tiny_moe), torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    with torch.no_grad():
        short = (ours(random_ids[:1, :60]) - ref(random_ids[:1, :60]).logits).abs().max()
        long = (ours(random_ids[:1, :100]) - ref(random_ids[:1, :100]).logits).abs().max()
    assert short < ATOL and long > 0.1


@pytest.mark.parametrize("prefill,total", [(30, 60), (80, 110)])
def test_cached_decode_equals_full_forward(pair, random_ids, prefill, total):
    from phi3v.models.cache import KVCache

    ours, _ = pair
    ids = random_ids[:1, :total]
    cache = KVCache.for_model(ours.config, 1, total)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :prefill], cache=cache, kv_len=prefill)]
        for t in range(prefill, total):
            steps.append(ours(ids[:, t:t + 1], pos=torch.tensor([[t]]), cache=cache, kv_len=t + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prompt_len", [20, 50])  # 50 + 32 crosses the LongRoPE boundary (64) while generating
def test_greedy_generation_matches_transformers(pair, random_ids, prompt_len):
    ours, ref = pair
    ids = random_ids[:1, :prompt_len]
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
    got = [s[0].token for s in generate_steps(ours, [Prompt(ids[0].tolist())], SamplingParams(max_new_tokens=32))]
    assert got == expected


@pytest.mark.parametrize("length", [12, 50])  # 12: within tiny_phi3's window of 16; 50: past it (tiny_moe's is not)
def test_causal_prefill_is_the_masked_one_bit_for_bit(pair, random_ids, monkeypatch, length):
    """A prompt from position 0 within the window runs SDPA with torch's causal bias instead of a (B, 1, T, S)
    mask (CausalLM.plain_causal): the same logits to the bit, with and without a longer cache behind it."""
    from phi3v.models.cache import KVCache

    ours, _ = pair
    ids = random_ids[:2, :length]
    window = ours.config.sliding_window
    assert ours.plain_causal(torch.arange(length).expand(2, length)) == (window is None or length <= window)
    with torch.no_grad():
        runs = []
        for plain in (True, False):
            if not plain:
                monkeypatch.setattr(type(ours), "plain_causal", lambda self, pos: False)
            cache = KVCache.for_model(ours.config, 2, length + 20)
            runs.append((ours(ids), ours(ids, cache=cache, kv_len=length + 20)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][1], runs[0][0], atol=ATOL, rtol=RTOL)


def test_plain_causal_only_for_prompts_from_the_start(tiny_phi3):
    ours = load_causal_lm(tiny_phi3, load_config(tiny_phi3), torch.float32)  # sliding window 16
    assert ours.plain_causal(torch.arange(10).expand(2, 10))
    assert not ours.plain_causal(torch.arange(3, 13).expand(1, 10))  # a continuation
    assert not ours.plain_causal(torch.tensor([[0, 1, 2], [1, 2, 3]]))  # one row not from 0
    assert not ours.plain_causal(torch.tensor([[0]]))  # decode keeps the mask
    assert not ours.plain_causal(torch.arange(17)[None])  # past the window
