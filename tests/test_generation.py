"""Generation in float32: batched rows equal single rows, sampling, repetition penalty, the API's stops and streams.

The tiny checkpoints have LongRoPE's boundary at 64, so prompts of 61 and 64 tokens cross it while generating
(their caches are recomputed with the long factors) and a prompt of 70 starts past it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import phi3v.api
from phi3v.models import load_config
from phi3v.errors import ContextLengthError, InputError
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.checkpoint.load import load_causal_lm
from phi3v.inference.sampling import SamplingParams, apply_repetition_penalty, make_sampler, top_k_filter, top_p_filter

PROMPT = "Write a short poem about the sea."


def run(model, prompts, params, stop_ids=frozenset(), max_context=None):
    """generate_steps collected per row: (tokens, finish_reason) of every row."""
    tokens, reasons = [[] for _ in prompts], [None] * len(prompts)
    for steps in generate_steps(model, [Prompt(list(p)) for p in prompts], params, stop_ids, max_context):
        for s in steps:
            assert reasons[s.row] is None, "a row yielded a token after its last step"
            tokens[s.row].append(s.token)
            reasons[s.row] = s.finish_reason
    return list(zip(tokens, reasons))


def greedy(model, ids, n, **kw):
    return run(model, [ids], SamplingParams(max_new_tokens=n), **kw)[0][0]


def count_forwards(model, fn) -> int:
    """How many forward passes of model fn() makes."""
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        hook.remove()
    return len(calls)


@pytest.fixture(scope="module")
def phi3(tiny_phi3):
    return load_causal_lm(tiny_phi3, load_config(tiny_phi3), torch.float32)


@pytest.fixture(scope="module")
def moe(tiny_moe):
    return load_causal_lm(tiny_moe, load_config(tiny_moe), torch.float32)


@pytest.fixture(scope="module")
def api_model(tiny_phi3):
    return phi3v.api.load(tiny_phi3, dtype="float32")


# ---- 1. batched rows equal single rows ----

LENGTHS = (5, 23, 61, 64, 70)  # short, short, crosses 64 while generating, at the first step, long from the start


@pytest.mark.parametrize("name", ["phi3", "moe"])
def test_batched_greedy_equals_single_rows(request, random_ids, name):
    model = request.getfixturevalue(name)
    prompts = [random_ids[i % 3, :n].tolist() for i, n in enumerate(LENGTHS)]
    params = SamplingParams(max_new_tokens=12)
    batched = run(model, prompts, params)
    for p, row in zip(prompts, batched):
        assert row == run(model, [p], params)[0]
        assert row[1] == "length" and len(row[0]) == 12


def test_batched_rows_that_finish_early_do_not_disturb_the_others(phi3, random_ids):
    """A stop id ends one row after its first token and max_context cuts another short; the rest go on unchanged."""
    prompts = [random_ids[0, :61].tolist(), random_ids[1, :23].tolist(), random_ids[2, :5].tolist()]
    stop = frozenset({greedy(phi3, prompts[1], 1)[0]})
    params = SamplingParams(max_new_tokens=15)
    batched = run(phi3, prompts, params, stop, max_context=70)
    assert batched[1] == ([next(iter(stop))], "stop")
    assert len(batched[0][0]) == 70 - 61 and batched[0][1] == "length"  # the context leaves room for 9 tokens
    for p, row in zip(prompts, batched):
        assert row == run(phi3, [p], params, stop, max_context=70)[0]


# ---- 2. sampling ----

def sampled(model, ids, **kw):
    return run(model, [ids], SamplingParams(max_new_tokens=16, **kw))[0][0]


def test_seeded_sampling_is_reproducible(phi3, random_ids):
    ids = random_ids[0, :20].tolist()
    a = sampled(phi3, ids, temperature=1.0, seed=7)
    assert a == sampled(phi3, ids, temperature=1.0, seed=7)
    assert a != sampled(phi3, ids, temperature=1.0, seed=8)
    assert a != greedy(phi3, ids, 16)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_sampling_is_greedy(phi3, random_ids, kw):
    ids = random_ids[1, :20].tolist()
    assert sampled(phi3, ids, temperature=1.0, seed=3, **kw) == greedy(phi3, ids, 16)


def test_unseeded_sampler_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    unseeded = SamplingParams(temperature=1.0)
    a, b = make_sampler(unseeded)(torch.zeros(1000, 10)), make_sampler(unseeded)(torch.zeros(1000, 10))
    assert torch.equal(torch.rand(4), expected)
    assert not torch.equal(a, b)  # each unseeded sampler gets its own fresh seed


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution written out by hand: softmax(logits / T), keep the top k, renormalize, keep the nucleus."""
    p = (logits / temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k or len(p)]] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    mass = 0.0
    for i in order.tolist():  # nucleus: the most probable tokens until their mass reaches top_p
        if mass >= top_p:
            p[i] = 0.0
        mass += p[i].item()
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (0.8, 0, 0.85),
                                                     (1.5, 5, 0.7)])
def test_sampled_distribution_matches_the_expected_probabilities(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.5])
    want = expected_probs(logits, temperature, top_k, top_p)
    n = 20000
    sample = make_sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0))
    freq = torch.bincount(sample(logits.expand(n, -1)), minlength=len(logits)).float() / n
    assert torch.equal(freq > 0, want > 0)  # tokens filtered out are never drawn
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)  # 4 standard deviations at worst


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_top_k_keeps_exactly_the_k_largest(k, seed):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed))
    kept = top_k_filter(logits, k).isfinite()
    assert kept.sum(-1).tolist() == [k] * 3
    for row, keep in zip(logits, kept):
        assert set(row.topk(k).indices.tolist()) == set(keep.nonzero().flatten().tolist())
    torch.testing.assert_close(top_k_filter(logits, k)[kept], logits[kept], rtol=0, atol=0)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 0.99), st.floats(0.1, 4.0), st.integers(0, 2**31 - 1))
def test_top_p_keeps_the_smallest_set_reaching_p(p, scale, seed):
    logits = scale * torch.randn(2, 30, generator=torch.Generator().manual_seed(seed))
    out = top_p_filter(logits, p)
    for row, filtered in zip(logits, out):
        probs = row.softmax(-1)
        kept = filtered.isfinite()
        n = int(kept.sum())
        ranked = probs.sort(descending=True).values
        assert set(probs.topk(n).indices.tolist()) == set(kept.nonzero().flatten().tolist())  # the most probable
        assert ranked[:n].sum() >= p - 1e-6  # reaches p
        assert n == 1 or ranked[:n - 1].sum() < p + 1e-6  # and one fewer would not
        assert torch.equal(filtered[kept], row[kept])


def test_top_p_on_a_hand_made_distribution():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()[None]
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.85).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logits, 1.0).isfinite().tolist() == [[True, True, True, True]]


# ---- 3. repetition penalty against transformers ----

def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 50, generator=g)
    logits[0, :5] = 0.0  # zero logits are a corner of the sign rule
    ids = torch.randint(0, 50, (4, 30), generator=g)  # with repeats
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, ids, True)
    for penalty in (0.7, 1.3, 2.0):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), want, rtol=0, atol=0)


@pytest.mark.parametrize("prompt_len,penalty", [(44, 1.3), (55, 1.3), (12, 0.7)])  # 55 + 20 crosses 64
def test_greedy_with_repetition_penalty_matches_transformers(phi3, tiny_phi3, random_ids, prompt_len, penalty):
    """A random model never picks a token it has seen, so each case makes the penalty bite: a penalty > 1 gets a
    prompt that starts with the model's own greedy continuation; a penalty < 1 makes it repeat its own tokens."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ref.generation_config.eos_token_id = None
    ids = random_ids[0, :prompt_len].tolist()
    if penalty > 1:
        ids = greedy(phi3, ids, 20) + ids[20:]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                            pad_token_id=0)[0, prompt_len:].tolist()
    got = run(phi3, [ids], SamplingParams(max_new_tokens=20, repetition_penalty=penalty))[0][0]
    assert got == want
    assert got != greedy(phi3, ids, 20)  # the penalty changed the generation
    if penalty < 1:
        assert len(set(got)) < len(got)  # it repeats its own tokens: generated tokens count as seen


# ---- 4. the Python API ----

@pytest.fixture(scope="module")
def reference(api_model, phi3):
    """The greedy completion of PROMPT as generate_steps gives it: (prompt ids, 40 tokens)."""
    ids = api_model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    tokens = greedy(phi3, ids, 40)
    assert not set(tokens) & api_model.tokenizer.stop_token_ids, "pick another prompt: greedy output hits an eos"
    return ids, tokens


def test_generate_equals_generate_steps(api_model, reference):
    ids, tokens = reference
    out = api_model.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == tokens
    assert out.prompt_tokens == len(ids) == len(api_model.render(PROMPT))
    assert out.finish_reason == "length"
    assert out.text == api_model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(out.text) > 40  # enough text for the stop-string tests below


def test_stop_string_cuts_the_text_and_the_generation(api_model, reference):
    full = api_model.generate(PROMPT, max_new_tokens=40)
    stop = full.text[20:26]
    cut = full.text.index(stop)
    out = api_model.generate(PROMPT, max_new_tokens=40, stop=[stop])
    assert out.text == full.text[:cut] and out.finish_reason == "stop"
    # generation stopped at the token that completed the stop string
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    decode = api_model.tokenizer.decode
    assert stop in decode(out.token_ids) and stop not in decode(out.token_ids[:-1])


def test_stream_concatenates_to_generate(api_model):
    full = api_model.generate(PROMPT, max_new_tokens=40)
    deltas = list(api_model.stream(PROMPT, max_new_tokens=40))
    assert "".join(deltas) == full.text and len(deltas) > 10


@pytest.mark.parametrize("start,length", [(20, 6), (3, 1), (30, 12)])
def test_stream_never_emits_the_stop_string(api_model, start, length):
    full = api_model.generate(PROMPT, max_new_tokens=40).text
    stop = full[start:start + length]
    want = full[:full.index(stop)]
    deltas = list(api_model.stream(PROMPT, max_new_tokens=40, stop=stop))
    assert "".join(deltas) == want == api_model.generate(PROMPT, max_new_tokens=40, stop=stop).text


def test_stream_releases_a_held_back_prefix_that_never_completes(api_model):
    """A stop string whose beginning appears in the text is held back, then sent when it does not complete."""
    full = api_model.generate(PROMPT, max_new_tokens=40)
    stop = full.text[-3:] + "\x00"  # the text ends with 3 characters of it
    out = api_model.generate(PROMPT, max_new_tokens=40, stop=[stop])
    assert (out.text, out.finish_reason) == (full.text, "length")
    assert "".join(api_model.stream(PROMPT, max_new_tokens=40, stop=[stop])) == full.text


@pytest.mark.parametrize("eos", [32000, 32001, 32007])
def test_eos_token_ends_generation(tiny_phi3, reference, eos):
    """The lm_head row of eos is made a copy of the token greedy picks at step k, plus a small bias: eos wins there."""
    ids, tokens = reference
    model = phi3v.api.load(tiny_phi3, dtype="float32")  # its own copy: the weights are edited
    assert eos in model.tokenizer.stop_token_ids
    k = next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])
    head = model.model.lm_head
    bias = torch.zeros(head.out_features)
    bias[eos] = 1e-3
    with torch.no_grad():
        head.weight[eos] = head.weight[tokens[k]]
    head.bias = torch.nn.Parameter(bias)
    out = model.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == tokens[:k] + [eos] and out.finish_reason == "stop"
    assert out.text == model.tokenizer.decode(tokens[:k])
    assert "".join(model.stream(PROMPT, max_new_tokens=40)) == out.text


def test_stop_ids_end_a_row_of_generate_steps(phi3, reference):
    ids, tokens = reference
    assert run(phi3, [ids], SamplingParams(max_new_tokens=40), frozenset({tokens[0]})) == [([tokens[0]], "stop")]
    k = 7
    assert run(phi3, [ids], SamplingParams(max_new_tokens=40), frozenset({tokens[k]}))[0] == (
        tokens[:tokens.index(tokens[k]) + 1], "stop")


# ---- 5. edge cases and errors ----

def test_max_new_tokens_zero(api_model, phi3, reference):
    out = api_model.generate(PROMPT, max_new_tokens=0)
    assert (out.text, out.token_ids, out.finish_reason) == ("", [], "length")
    assert out.prompt_tokens == len(reference[0])
    assert list(api_model.stream(PROMPT, max_new_tokens=0)) == []
    assert run(phi3, [reference[0]], SamplingParams(max_new_tokens=0)) == [([], None)]


def test_prompt_longer_than_the_context_fails_before_any_work(api_model, phi3, reference):
    ids = reference[0]
    for max_context in (len(ids) - 5, len(ids)):  # too long; exactly full (no room for a new token)
        def fails():
            with pytest.raises(ContextLengthError, match=rf"prompt of {len(ids)} tokens .* context of {max_context}"):
                run(phi3, [[1, 2, 3], ids], SamplingParams(max_new_tokens=4), max_context=max_context)
        assert count_forwards(phi3, fails) == 0
    # one token of room: exactly one new token
    assert run(phi3, [ids], SamplingParams(max_new_tokens=4), max_context=len(ids) + 1) == [
        ([reference[1][0]], "length")]
    with pytest.raises(ContextLengthError, match="max_context"):
        list(api_model.stream_batch([ids], SamplingParams(max_new_tokens=4), max_context=len(ids) - 1))


@pytest.mark.parametrize("kw", [dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(max_new_tokens=-1), dict(repetition_penalty=0.0), dict(stop=""),
                                dict(stop=["ok", ""])])
def test_invalid_sampling_params(api_model, kw):
    with pytest.raises(InputError):
        SamplingParams(**kw)
    with pytest.raises(InputError):
        api_model.generate(PROMPT, **kw)


def test_no_wasted_forward_passes(phi3, random_ids):
    """A prefill, one pass per decode step, one cache recompute per row crossing LongRoPE's boundary while it is
    still generating; nothing at all for max_new_tokens=0."""
    prompts = [random_ids[0, :61].tolist(), random_ids[1, :5].tolist()]
    params = SamplingParams(max_new_tokens=12)
    assert count_forwards(phi3, lambda: run(phi3, prompts, SamplingParams(max_new_tokens=0))) == 0
    assert count_forwards(phi3, lambda: run(phi3, prompts, params)) == 1 + 11 + 1
    # max_context=65: the first row's last token is its 65th, so it finishes at the boundary: no recompute
    assert count_forwards(phi3, lambda: run(phi3, prompts, params, max_context=65)) == 1 + 11


def test_empty_prompt_is_an_input_error(phi3):
    with pytest.raises(InputError, match="empty prompt"):
        run(phi3, [[1, 2], []], SamplingParams(max_new_tokens=2))


# ---- 6. generate_batch ----

def test_generate_batch_equals_single_generate(api_model):
    chat = [{"role": "user", "content": "Count to ten."}, {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Now continue all the way to fifty, please, slowly."}]
    prompts = [PROMPT, "Hi", chat]  # 15 + 56 tokens cross LongRoPE's 64 while generating
    full = api_model.generate(PROMPT, max_new_tokens=56).text
    for kw in (dict(max_new_tokens=56), dict(max_new_tokens=56, stop=[full[10:14]]), dict(max_new_tokens=0)):
        batch = api_model.generate_batch(prompts, **kw)
        assert batch == [api_model.generate(p, **kw) for p in prompts]
        assert batch[0].finish_reason == ("stop" if "stop" in kw else "length")
    assert len(api_model.render(PROMPT)) == 15
