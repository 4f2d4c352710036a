"""The continuous-batching engine: joining and leaving requests, chunked prefill, KV reuse across turns, budgets."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import FIXTURES
from phi3v.api import load
from phi3v.models import load_config
from phi3v.inference.engine import Engine
from phi3v.errors import ContextLengthError
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.checkpoint.load import load_causal_lm
from phi3v.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    return load_causal_lm(tiny_phi3, load_config(tiny_phi3), torch.float32)


def solo(model, ids, params, stop_ids=frozenset()):
    return [s[0].token for s in generate_steps(model, [Prompt(ids)], params, stop_ids)]


def drain(engine, until=None):
    """Step the engine; collect tokens per request id (until `until` steps, or until it is idle)."""
    got: dict[int, list[int]] = {}
    n = 0
    while engine.has_work() and (until is None or n < until):
        for s in engine.step():
            got.setdefault(s.row, []).append(s.token)
        n += 1
    return got


def test_requests_join_and_leave_between_steps(phi3, random_ids):
    """Each request, whatever joins or leaves around it, gets exactly the tokens it gets alone: greedy, seeded
    sampling, its own stop ids; one prompt crosses LongRoPE's boundary (64) while others decode."""
    specs = [
        (random_ids[0, :10].tolist(), SamplingParams(max_new_tokens=20)),
        (random_ids[1, :55].tolist(), SamplingParams(max_new_tokens=25)),  # crosses 64 while generating
        (random_ids[2, :30].tolist(), SamplingParams(max_new_tokens=15, temperature=0.9, top_k=50, seed=7)),
        (random_ids[0, 40:48].tolist(), SamplingParams(max_new_tokens=12, repetition_penalty=1.3)),
    ]
    expected = [solo(phi3, ids, p) for ids, p in specs]
    stop_at = expected[0][5]  # request 4 reuses prompt 0 but stops at its 6th greedy token
    expected.append(solo(phi3, specs[0][0], specs[0][1], frozenset({stop_at})))
    engine = Engine(phi3, max_batch=3, max_context=96, prefill_chunk=16)
    ids = [engine.add(Prompt(specs[0][0]), specs[0][1])]
    got = drain(engine, until=3)  # request 0 alone for a few steps
    ids += [engine.add(Prompt(i), p) for i, p in specs[1:4]]  # 3 more, one must wait for a free slot
    ids.append(engine.add(Prompt(specs[0][0]), specs[0][1], frozenset({stop_at})))
    for rid, toks in drain(engine).items():
        got.setdefault(rid, []).extend(toks)
    assert [got[i] for i in ids] == expected
    assert expected[4][-1] == stop_at and len(expected[4]) < 20


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(phi3, random_ids, chunk):
    ids = random_ids[0, :50].tolist()
    engine = Engine(phi3, max_batch=1, max_context=80, prefill_chunk=chunk)
    engine.add(Prompt(ids), SamplingParams(max_new_tokens=20))
    assert drain(engine)[0] == solo(phi3, ids, SamplingParams(max_new_tokens=20))


def test_next_chat_turn_reuses_the_cache_and_equals_recomputing(tiny_phi3):
    m = load(tiny_phi3, dtype="float32")
    convo = [{"role": "user", "content": "Tell me about the sea, in detail please."}]
    first = m.chat(convo, max_new_tokens=12)
    assert first == m.generate(convo, max_new_tokens=12)
    convo += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the mountains?"}]
    before = m.engine().reused_tokens
    second = m.chat(convo, max_new_tokens=30)  # 30 more tokens cross LongRoPE's boundary of 64
    assert m.engine().reused_tokens - before > 20  # the first turn was not computed again
    assert second == m.generate(convo, max_new_tokens=30)


def test_image_chat_turns_reuse_cache_and_features(monkeypatch):
    d = FIXTURES / "phi35_vision_tiny"
    m = load(d, dtype="float32")
    calls = []
    tower = m.model.model.vision_embed_tokens
    orig = type(tower).forward
    monkeypatch.setattr(type(tower), "forward", lambda self, *a: calls.append(1) or orig(self, *a))
    img = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    convo = [{"role": "user", "content": "What is this?", "images": [img]}]
    first = m.chat(convo, max_new_tokens=8)
    convo += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Are you sure?"}]
    before = m.engine().reused_tokens
    second = m.chat(convo, max_new_tokens=8)
    assert len(calls) == 1  # the image went through CLIP once
    assert m.engine().reused_tokens - before > 700  # the image tokens were not computed again
    assert second == m.generate(convo, max_new_tokens=8)


def test_different_image_same_size_is_not_reused():
    """Two images of the same size have the same placeholder ids: the cache key must still tell them apart."""
    m = load(FIXTURES / "phi35_vision_tiny", dtype="float32")
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (200, 300, 3), dtype=np.uint8) for _ in range(2))
    m.chat([{"role": "user", "content": "Describe.", "images": [a]}], max_new_tokens=4)
    before = m.engine().reused_tokens
    got = m.chat([{"role": "user", "content": "Describe.", "images": [b]}], max_new_tokens=4)
    assert m.engine().reused_tokens - before < 10
    assert got == m.generate("Describe.", images=[b], max_new_tokens=4)


def test_request_over_the_context_fails_before_any_work(phi3, random_ids, monkeypatch):
    engine = Engine(phi3, max_batch=2, max_context=32)
    calls = []
    monkeypatch.setattr(type(phi3), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ContextLengthError, match="prompt of 40 tokens does not fit the context of 32 tokens"):
        engine.add(Prompt(random_ids[0, :40].tolist()), SamplingParams(max_new_tokens=4))
    assert not calls and not engine.has_work()


def test_kv_budget_is_checked_when_the_cache_is_made(phi3):
    cfg = phi3.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # float32
    Engine(phi3, max_batch=2, max_context=100, kv_budget=2 * 101 * per_token)
    with pytest.raises(ContextLengthError, match="over the budget"):
        Engine(phi3, max_batch=4, max_context=100, kv_budget=2 * 101 * per_token)


def test_cancel_frees_the_slot(phi3, random_ids):
    engine = Engine(phi3, max_batch=1, max_context=64)
    a = engine.add(Prompt(random_ids[0, :10].tolist()), SamplingParams(max_new_tokens=30))
    b = engine.add(Prompt(random_ids[1, :10].tolist()), SamplingParams(max_new_tokens=5))
    engine.step()
    engine.cancel(a)
    got = drain(engine)
    assert a not in got and got[b] == solo(phi3, random_ids[1, :10].tolist(), SamplingParams(max_new_tokens=5))


def test_logits_processors_and_logprobs(phi3, random_ids):
    """A processor that bans the greedy token changes the pick; logprobs are log_softmax of the final logits."""
    ids = random_ids[0, :12].tolist()
    greedy = solo(phi3, ids, SamplingParams(max_new_tokens=1))[0]

    def ban(generated, logits):
        return logits.index_fill(-1, torch.tensor([greedy]), float("-inf"))

    engine = Engine(phi3, max_batch=1, max_context=32)
    engine.add(Prompt(ids), SamplingParams(max_new_tokens=1), processors=[ban], logprobs=3)
    (step,) = engine.step()
    with torch.no_grad():
        lp = torch.log_softmax(phi3(torch.tensor([ids]))[0, -1].float(), -1)
    lp[greedy] = float("-inf")
    lp = torch.log_softmax(lp, -1)
    assert step.token != greedy and step.token == int(lp.argmax())
    assert step.logprob == pytest.approx(float(lp.max()), abs=1e-4)
    assert [t for t, _ in step.top_logprobs] == torch.topk(lp, 3).indices.tolist()


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens(phi3, random_ids):
    ids = random_ids[1, :20].tolist()
    engine = Engine(phi3, max_batch=1, max_context=48, compile=True)
    engine.add(Prompt(ids), SamplingParams(max_new_tokens=12))
    assert drain(engine)[0] == solo(phi3, ids, SamplingParams(max_new_tokens=12))
