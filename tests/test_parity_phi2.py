"""Phi-2 (PhiForCausalLM) against transformers 5.23 in float32, on a tiny random checkpoint cut from the published
config: partial rotary (32 of 80 head dims), parallel attention + MLP off one LayerNorm, gelu_new, biases everywhere.
Also: float16 on a long prompt without NaN (scores in float32), a byte-level BPE tokenizer.json loaded by phi3v's
Tokenizer (no chat template: raw prompts), serving one request, and int8 / int4 quantization.
"""

from __future__ import annotations

import json

import pytest
import torch

from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.inference.sampling import SamplingParams
from phi3v.models import load_config
from phi3v.models.cache import KVCache

transformers = pytest.importorskip("transformers")
ATOL = RTOL = 1e-4
VOCAB = 51200
# microsoft/phi-2's config.json (no copy of it is stored in shared/)
PHI2 = dict(
    architectures=["PhiForCausalLM"], model_type="phi", attention_dropout=0.0, bos_token_id=50256, embd_pdrop=0.0,
    eos_token_id=50256, hidden_act="gelu_new", hidden_size=2560, initializer_range=0.02, intermediate_size=10240,
    layer_norm_eps=1e-5, max_position_embeddings=2048, num_attention_heads=32, num_hidden_layers=32,
    num_key_value_heads=32, partial_rotary_factor=0.4, qk_layernorm=False, resid_pdrop=0.1, rope_scaling=None,
    rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float16", use_cache=True, vocab_size=VOCAB,
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
          "Textbooks are all you need: small models trained on good data.", "Once upon a time, in a land far away."]
EOT = "<|endoftext|>"


def byte_level_tokenizer(out) -> None:
    """A small CodeGen/GPT-2 style byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CodeGenTokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
         "add_prefix_space": False, "model_max_length": 2048}))


@pytest.fixture(scope="module")
def phi2_like(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi2_like")
    (d / "config.json").write_text(json.dumps(PHI2))
    byte_level_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny_phi2(tmp_path_factory, phi2_like):
    """Head dim 80 as published (rotary on 32 of them), 2 heads, 2 layers."""
    return create_random(phi2_like, tmp_path_factory.mktemp("tiny_phi2"), seed=5, std=0.15, layers=2, hidden=160,
                         heads=2, intermediate=256, dtype="float32")


@pytest.fixture(scope="module")
def pair(tiny_phi2):
    ours = load_causal_lm(tiny_phi2, load_config(tiny_phi2), torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi2, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return ours, ref


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 140), generator=torch.Generator().manual_seed(0))


def test_config_is_phi2(tiny_phi2):
    cfg = load_config(tiny_phi2)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.layer_norm_eps) == (80, 32, 1e-5)


@pytest.mark.parametrize("length", [7, 140])
def test_logits_match_reference(pair, ids, length):
    ours, ref = pair
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1, :length]), ref(ids[:1, :length]).logits, atol=ATOL, rtol=RTOL)


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


def test_float16_long_prompt_has_no_nan(tiny_phi2):
    """float16 on a 1024-token prompt stays within float16 rounding of float32. With q/k scaled up (Phi-2's real
    activations are large) q.k overflows float16: the reference's float16 eager attention then gives NaN, ours,
    with the scores in float32, stays finite."""
    ours = load_causal_lm(tiny_phi2, load_config(tiny_phi2), torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi2, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    x = torch.randint(0, VOCAB, (1, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
        half = load_causal_lm(tiny_phi2, load_config(tiny_phi2), torch.float16)
        got = half(x).float()
        assert (got - want).abs().max() < 0.02 * want.std()
        for model in (half, ref.half()):
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(24.0)  # the reference overflows from about x20 here
        assert torch.isfinite(half(x)).all() and not torch.isfinite(ref(x).logits).all()


def test_byte_level_tokenizer_round_trips(tiny_phi2):
    from phi3v.processing.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer.from_dir(tiny_phi2)
    text = "def add(a, b):\n    return a + b  # émoji 🦊"
    ids = tok.encode(text)
    assert ids == HFTokenizer.from_file(str(tiny_phi2 / "tokenizer.json")).encode(text).ids
    assert tok.decode(ids) == text and tok.eos_token_id == tok.encode(EOT)[0]


def test_serves_one_request(tiny_phi2):
    import httpx

    from phi3v.api import load
    from phi3v.serve.app import Settings, create_app, running

    model = load(tiny_phi2, dtype="float32")
    want = model.generate("Once upon a time", raw=True, max_new_tokens=12)
    with running(create_app(model, Settings(max_batch=2, max_context=256))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": tiny_phi2.name, "prompt": "Once upon a time", "max_tokens": 12,
                                                       "temperature": 0}, timeout=60).json()
    assert "choices" in r, r
    assert r["choices"][0]["text"] == want.text and r["usage"]["completion_tokens"] == len(want.token_ids) == 12


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_generation(tiny_phi2, scheme):
    from phi3v.api import load
    from phi3v.quant.layers import QUANTIZED, quantize_model

    model = load(tiny_phi2, dtype="float32")
    want = model.generate("The quick brown fox", raw=True, max_new_tokens=8).token_ids
    spec = quantize_model(model.model, scheme, group_size=32)
    assert not spec["skipped"] and sum(isinstance(m, QUANTIZED) for m in model.model.modules()) == 2 * 6 + 1
    got = model.generate("The quick brown fox", raw=True, max_new_tokens=8).token_ids
    assert len(got) == 8 and (scheme == "int4" or got[:4] == want[:4])
