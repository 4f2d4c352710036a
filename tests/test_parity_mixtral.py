"""Mixtral (MixtralForCausalLM) against transformers 5.23 in float32, on a tiny random checkpoint cut from Mixtral
8x7B's published config: 8 experts, softmax top-2 router (renormalised), GQA 4/2, RMSNorm, and a sliding window of
16 that bites. Experts are written per expert (w1/w2/w3) as the published checkpoint is. Also serving one request
and int8 / int4 quantization. The Phi-3.5-mini tokenizer stands in for Mistral's (vocab widened to fit it).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import PHI35_MINI, TOKENIZER_FILES, require_shared
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.checkpoint.safetensors import read_state_dict
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.inference.sampling import SamplingParams
from phi3v.models import load_config
from phi3v.models.cache import KVCache

transformers = pytest.importorskip("transformers")
ATOL = RTOL = 1e-4
WINDOW = 16
# mistralai/Mixtral-8x7B-v0.1's config.json (no copy is stored in shared/); vocab 32064 for the stand-in tokenizer
MIXTRAL = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
    hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=14336, max_position_embeddings=32768,
    num_attention_heads=32, num_experts_per_tok=2, num_hidden_layers=32, num_key_value_heads=8, num_local_experts=8,
    output_router_logits=False, rms_norm_eps=1e-5, rope_theta=1e6, router_aux_loss_coef=0.02, sliding_window=None,
    tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, vocab_size=32064,
)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    require_shared()
    like = tmp_path_factory.mktemp("mixtral_like")
    (like / "config.json").write_text(json.dumps(MIXTRAL))
    for f in TOKENIZER_FILES:
        shutil.copyfile(PHI35_MINI / f, like / f)
    return create_random(like, tmp_path_factory.mktemp("tiny_mixtral"), seed=7, std=0.15, layers=2, hidden=64,
                         heads=4, kv_heads=2, intermediate=96, sliding_window=WINDOW, dtype="float32")


@pytest.fixture(scope="module")
def pair(tiny_mixtral):
    ours = load_causal_lm(tiny_mixtral, load_config(tiny_mixtral), torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return ours, ref


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 32000, (3, 100), generator=torch.Generator().manual_seed(0))


def test_checkpoint_layout_is_per_expert(tiny_mixtral):
    names = read_state_dict(tiny_mixtral)
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names and not any(".experts.w" in k for k in names)
    assert load_config(tiny_mixtral).sliding_window == WINDOW


@pytest.mark.parametrize("length", [WINDOW, 100])  # inside the window; far past it
def test_logits_match_reference(pair, ids, length):
    ours, ref = pair
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1, :length]), ref(ids[:1, :length]).logits, atol=ATOL, rtol=RTOL)


def test_window_and_router_bite(pair, ids):
    """A model without the window, or with a plain top-2 (no softmax over all), would be visibly different."""
    from phi3v.models import mixtral

    ours, _ = pair
    x = ids[:1, :60]
    with torch.no_grad():
        want = ours(x)
        ours.config.sliding_window = None
        try:
            no_window = ours(x)
        finally:
            ours.config.sliding_window = WINDOW
        probs = torch.softmax(ours.model.layers[0].block_sparse_moe.gate(ours.model.embed_tokens(x)).float(), -1)
    assert (no_window - want).abs().max() > 0.1
    top2 = probs.topk(2, -1).values
    assert (top2.sum(-1) < 0.9).any()  # renormalisation changes the weights
    w, e = mixtral.softmax_topk(torch.log(probs[0]), 2)
    torch.testing.assert_close(w, top2[0] / top2[0].sum(-1, keepdim=True))


def test_batch_rows_match_reference(pair, ids):
    ours, ref = pair
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :50]), ref(ids[:, :50]).logits, atol=ATOL, rtol=RTOL)


def test_cached_decode_equals_full_forward(pair, ids):
    ours, _ = pair
    total, prefill = 60, 25
    x = ids[:1, :total]
    cache = KVCache.for_model(ours.config, 1, total)
    with torch.no_grad():
        full = ours(x)
        steps = [ours(x[:, :prefill], cache=cache, kv_len=prefill)]
        for t in range(prefill, total):
            steps.append(ours(x[:, t:t + 1], pos=torch.tensor([[t]]), cache=cache, kv_len=t + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)


def test_greedy_generation_matches_transformers(pair, ids):
    ours, ref = pair
    prompt = ids[:1, :20]
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    got = [s[0].token for s in generate_steps(ours, [Prompt(prompt[0].tolist())], SamplingParams(max_new_tokens=32))]
    assert got == expected


def test_serves_one_chat_request(tiny_mixtral):
    import httpx

    from phi3v.api import load
    from phi3v.serve.app import Settings, create_app, running

    model = load(tiny_mixtral, dtype="float32")
    messages = [{"role": "user", "content": "Hello there."}]
    want = model.generate(messages, max_new_tokens=10)
    with running(create_app(model, Settings(max_batch=2, max_context=256))) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": tiny_mixtral.name, "messages": messages,
                                                            "max_tokens": 10, "temperature": 0}, timeout=60).json()
    assert "choices" in r, r
    assert r["choices"][0]["message"]["content"] == want.text and r["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_generation(tiny_mixtral, scheme):
    from phi3v.api import load
    from phi3v.quant.layers import Int8Experts, quantize_model

    model = load(tiny_mixtral, dtype="float32")
    want = model.generate("Tell me a story.", max_new_tokens=8).token_ids
    spec = quantize_model(model.model, scheme, group_size=32)
    assert spec["experts"] == "int8" and not spec["skipped"]
    assert sum(isinstance(m, Int8Experts) for m in model.model.modules()) == 2
    got = model.generate("Tell me a story.", max_new_tokens=8).token_ids
    assert len(got) == 8 and (scheme == "int4" or got[:4] == want[:4])


def test_export_is_the_published_layout(pair, ids, tiny_mixtral, tmp_path):
    """What `phi3v train` / `phi3v unlearn` export (experts unstacked again) loads in transformers unchanged."""
    from phi3v.train.export import export_hf

    ours, _ = pair
    out = export_hf(ours, json.loads((tiny_mixtral / "config.json").read_text()), tiny_mixtral, tmp_path / "export")
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in read_state_dict(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1, :30]), ref(ids[:1, :30]).logits, atol=ATOL, rtol=RTOL)
