"""`phi3v serve`: the OpenAI-compatible server, driven by the official `openai` client and raw HTTP, on tiny models.

Greedy answers must equal the Python API's (hence `phi3v generate`'s); bad input gets OpenAI's error object with the
right status code and leaves the server healthy; 16 concurrent streams are batched together.
"""

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import phi3v
from conftest import FIXTURES
from phi3v.api import load
from phi3v.examples import example_image
from phi3v.inference.json_mode import START, JsonVocab, cost, feed, feed_text
from phi3v.serve.app import Settings, create_app, running

VISION = FIXTURES / "phi35_vision_tiny"
KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello there, tell me a story."}]


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vision():
    return load(VISION, dtype="float32")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    example_image(d / "chart.png")
    return d


@pytest.fixture(scope="module")
def vserver(vision, allowed):
    """The vision model, no API key; small limits so that the limit tests are cheap."""
    app = create_app(vision, Settings(max_batch=16, max_context=1024, allow_dirs=(allowed,), max_images=2,
                                      max_image_pixels=1_000_000, max_tokens_limit=256, max_body_bytes=1 << 20))
    with running(app) as url:
        yield url, app.state.service


@pytest.fixture(scope="module")
def client(vserver):
    return openai.OpenAI(base_url=vserver[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def text(tiny_phi3):
    return load(tiny_phi3, dtype="float32")


@pytest.fixture(scope="module")
def tserver(text):
    """The text model behind an API key, 16 slots."""
    with running(create_app(text, Settings(max_batch=16, max_context=256, api_key=KEY))) as url:
        yield url


def name_of(url: str) -> str:
    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]


def assert_healthy(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200


# --------------------------------------------------------------------------- happy paths, with the openai client

def test_the_readme_server_example_works_as_written(vserver, vision, capsys):
    """The README's client snippet, run word for word against a served model (only the address differs)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Server"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    url, _ = vserver
    exec(compile(code.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    want = vision.generate("What does this chart show?", images=[phi3v.example_image()], max_new_tokens=32)
    assert printed == want.text + "\n"


def test_models_and_health(vserver, client):
    url, svc = vserver
    assert [m.id for m in client.models.list().data] == ["phi35_vision_tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "phi35_vision_tiny"}


def test_chat_greedy_equals_the_python_api(vision, client):
    want = vision.generate(HELLO, max_new_tokens=20)
    r = client.chat.completions.create(model="phi35_vision_tiny", messages=HELLO, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)

    chunks = list(client.chat.completions.create(model="phi35_vision_tiny", messages=HELLO, max_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_image_as_data_url_equals_the_python_api(vision, client, allowed):
    question = "What does this chart show?"
    want = vision.generate(question, images=[str(example_image())], max_new_tokens=12)
    for url in (data_url(example_image().read_bytes()), (allowed / "chart.png").as_uri()):
        r = client.chat.completions.create(model="phi35_vision_tiny", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}])
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.prompt_tokens > 700  # the image's tokens are counted


def test_logprobs_n_seed_and_stop(vision, client):
    want = vision.generate(HELLO, max_new_tokens=8)
    r = client.chat.completions.create(model="phi35_vision_tiny", messages=HELLO, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == want.text
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])

    sampled = dict(model="phi35_vision_tiny", messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=2)
    r1, r2 = client.chat.completions.create(**sampled), client.chat.completions.create(**sampled)
    texts = [c.message.content for c in r1.choices]
    assert [c.index for c in r1.choices] == [0, 1] and texts == [c.message.content for c in r2.choices]
    assert texts == [vision.generate(HELLO, max_new_tokens=10, temperature=1.0, seed=s).text for s in (5, 6)]
    assert r1.usage.completion_tokens == 20

    stop = want.text[len(want.text) // 2:][:3]
    r = client.chat.completions.create(model="phi35_vision_tiny", messages=HELLO, max_tokens=8, temperature=0,
                                       stop=[stop])
    assert r.choices[0].message.content == want.text[:want.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("max_tokens,temperature", [(48, 0.0), (48, 1.0), (4, 1.0)])
def test_json_mode_answers_are_json_objects(client, max_tokens, temperature):
    r = client.chat.completions.create(model="phi35_vision_tiny", messages=HELLO, max_tokens=max_tokens,
                                       temperature=temperature, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.usage.completion_tokens <= max_tokens


def test_completions_raw_prompt(text, tserver):
    c = openai.OpenAI(base_url=tserver + "/v1", api_key=KEY, max_retries=0)
    want = text.generate("Once upon a time", raw=True, max_new_tokens=16)
    r = c.completions.create(model=name_of(tserver), prompt="Once upon a time", max_tokens=16, temperature=0,
                             logprobs=2)
    assert r.choices[0].text == want.text and r.object == "text_completion"
    assert len(r.choices[0].logprobs.tokens) == len(want.token_ids) == r.usage.completion_tokens
    assert r.usage.prompt_tokens == want.prompt_tokens
    streamed = c.completions.create(model=name_of(tserver), prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want.text


def test_concurrent_streams_are_batched_and_independent(text, tserver):
    c = openai.OpenAI(base_url=tserver + "/v1", api_key=KEY, max_retries=0)
    name, n_tokens = name_of(tserver), 48
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} times {i + 3}?"}] for i in range(16)]
    want = [text.generate(p, max_new_tokens=n_tokens).text for p in prompts]

    def ask(i: int, out: dict) -> None:
        stream = c.chat.completions.create(model=name, messages=prompts[i], max_tokens=n_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        out[i] = ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                  chunks[-1].usage.completion_tokens)

    def run(ids: list[int]) -> dict:
        out: dict = {}
        threads = [threading.Thread(target=ask, args=(i, out)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # (throughput, one client against 16, is measured by benchmarks/server_concurrency.py, not asserted here)
    solo = run([1])
    many = run(list(range(16)))
    assert solo[1][0] == want[1]
    assert [many[i][0] for i in range(16)] == want
    assert all(many[i][1] == len(text.generate(prompts[i], max_new_tokens=n_tokens).token_ids) for i in range(16))


def first_token(response):
    """Read a stream up to its first generated token (the role chunk comes before the request has a slot); returns
    the line iterator, to keep alive: closing it closes the connection."""
    lines = response.iter_lines()
    while not ((line := next(lines)).startswith("data:") and '"role"' not in line):
        pass
    return lines


def wait_for(condition, timeout: float = 120.0) -> bool:
    """Wait for an event, not for a time: the timeout only ends a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# Prompts past the text fixture's LongRoPE boundary (64): a request that crosses it while decoding has its cache
# recomputed, and goes back to waiting for that step; one that starts past it never does (no transient states).
PAST_BOUNDARY = [{"role": "user", "content": "Tell me a long story about the sea. " * 10}]


def test_disconnect_frees_the_slot_and_a_full_queue_answers_429(text):
    """One slot and at most one waiting request: a third request gets 429; a client that leaves mid-stream is
    cancelled at once, and the next one gets its slot. The answers are asked for 60,000 tokens so that none can end
    by itself while the test looks (4,000 could, on a fast machine, before the third request arrived)."""
    app = create_app(text, Settings(max_batch=1, max_context=1 << 16, max_queue=1, max_tokens_limit=1 << 16))
    svc = app.state.service
    body = {"model": svc.name, "messages": PAST_BOUNDARY, "max_tokens": 60_000, "stream": True, "ignore_eos": True}
    second_running, leave = threading.Event(), threading.Event()

    def second(url):
        with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/chat/completions",
                                                                         json=body) as r:
            lines = first_token(r)  # noqa: F841 (kept open)
            second_running.set()
            leave.wait(120)

    with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = first_token(r)  # noqa: F841 (kept open: it holds the only slot)
            waiter = threading.Thread(target=second, args=(url,))
            waiter.start()
            assert wait_for(lambda: svc.worker.waiting == 1)
            assert "phi3v_queue_length 1\n" in http.get("/metrics").text
            r429 = http.post("/v1/chat/completions", json=body)
            assert r429.status_code == 429 and r429.json()["error"]["code"] == "queue_full"
        assert second_running.wait(120)  # the first client left: its slot went to the waiting one
        leave.set()
        waiter.join()
        assert wait_for(lambda: not svc.engine.has_work())  # and once it left too, nothing runs
        assert wait_for(lambda: "phi3v_running_requests 0\n" in http.get("/metrics").text)
        assert svc.worker.generated < 60_000  # both were cancelled: together they made less than one answer
        assert_healthy(url)


# --------------------------------------------------------------------------- JSON mode's validator

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.sampled_from([None, 2]), st.booleans())
def test_validator_accepts_every_prefix_of_json_objects(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    state = START
    for i, ch in enumerate(text):
        state = feed(state, ch)
        assert state is not None, (text, i)
        assert cost(state) == len(shortest_completion(state))
    assert state[1] == "done" and cost(state) == 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]":,.-+eE0123456789truefalsn \\u\n', max_size=24))
def test_validator_completes_only_json_objects(text):
    state = feed_text(START, text)
    if state is not None and state[1] == "done":
        assert isinstance(json.loads(text), dict)
    try:
        ok = isinstance(json.loads(text), dict)
    except ValueError:
        ok = False
    if ok:
        assert state is not None and state[1] == "done"


def shortest_completion(state) -> str:
    """Breadth-first search over states for the shortest text that completes the object (opening a container never
    helps, so { and [ are left out: that keeps the search small)."""
    alphabet = '}]":,.0123456789abcdeflnrstu\\'
    frontier, seen = [(state, "")], {state}
    while frontier:
        nxt = []
        for s, path in frontier:
            if s[1] == "done":
                return path
            for ch in alphabet:
                t = feed(s, ch)
                if t is not None and t not in seen:
                    seen.add(t)
                    nxt.append((t, path + ch))
        frontier = nxt
    raise AssertionError(f"no completion from {state}")


@pytest.mark.parametrize("prefix", ['{', '{"a', '{"a"', '{"a":', '{"a": [1, tr', '{"a": "x\\u0', '{"a": -', '{"a":1e-'])
def test_cost_is_the_shortest_completion(prefix):
    state = feed_text(START, prefix)
    assert cost(state) == len(shortest_completion(state))


def test_json_vocab_decodes_tokens_as_the_tokenizer(vision):
    tok = vision.tokenizer
    vocab = JsonVocab(tok, vision.config.vocab_size)
    ids = tok.encode('{"name": "Ada", "n": [1, 2.5, true, null], "s": "a\\nb"}')
    assert "".join(vocab.texts[i] for i in ids).lstrip(" ") == tok.decode(ids)


# --------------------------------------------------------------------------- shutdown and the command line

def test_shutdown_lets_requests_finish_within_the_grace_then_cancels(text):
    """Events in a fixed order, no race against the clock: the short stream has finished and the long one is running
    when shutdown starts; the engine is then held, so the long one cannot finish within the grace and is cut."""
    app = create_app(text, Settings(max_batch=2, max_context=4096, max_tokens_limit=4096, shutdown_grace_s=0.2))
    svc = app.state.service
    got: dict = {}
    release = threading.Event()
    step, stop = svc.engine.step, svc.worker.stop

    def held_step():
        if "short" in got:  # after the short answer is complete, the engine makes no more progress
            release.wait(30)
        return step()

    def stop_after_release():  # shutdown: let the engine thread go, then end it
        release.set()
        stop()

    svc.engine.step, svc.worker.stop = held_step, stop_after_release

    def stream(key: str, url: str, max_tokens: int, started=None) -> None:
        body = {"model": svc.name, "messages": PAST_BOUNDARY, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = []
            try:
                for line in r.iter_lines():
                    lines += [line] if line else []
            except httpx.HTTPError:  # cut off
                pass
        got[key] = lines

    with running(app) as url:
        long = threading.Thread(target=stream, args=("long", url, 4000))
        long.start()
        assert wait_for(lambda: len(svc.engine.running) == 1)
        stream("short", url, 100)  # runs beside the long one, to its end, before shutdown starts
        assert wait_for(lambda: len(svc.engine.running) == 1)  # the long one holds its slot
    # the server has stopped: the short answer was finished, the long one cut at the grace period
    long.join()
    assert got["short"][-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(got["short"])
    assert "data: [DONE]" not in got["long"]
    assert not svc.engine.has_work() and not svc.worker._thread.is_alive()


def test_serve_command(text, tiny_phi3, monkeypatch, capsys):
    import argparse

    import uvicorn

    from phi3v.cli import serve as serve_command

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_phi3), "--host", "0.0.0.0", "--max-batch", "3",
                              "--allow-dir", str(tiny_phi3), "--dtype", "float32"])
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.delenv("PHI3V_API_KEY", raising=False)
    serve_command.run(args)
    assert "without an API key" in capsys.readouterr().err
    svc = served["app"].state.service
    assert (served["host"], served["port"], svc.engine.max_batch) == ("0.0.0.0", 8000, 3)
    assert svc.settings.allow_dirs == (tiny_phi3.resolve(),) and svc.name == tiny_phi3.name

    monkeypatch.setenv("PHI3V_API_KEY", "from-env")
    args.host = "127.0.0.1"
    serve_command.run(args)
    assert "warning" not in capsys.readouterr().err
    assert served["app"].state.service.settings.api_key == "from-env"
