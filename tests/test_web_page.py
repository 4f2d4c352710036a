"""The web chat page at `/`, in headless Chromium (Debian's, driven by Playwright): attach an image, ask about it,
see the answer stream in; it must equal the Python API's greedy answer. Leaves a screenshot in test-artifacts/."""

import os
from pathlib import Path

import pytest

from conftest import FIXTURES
from phi3v.api import load
from phi3v.examples import example_image
from phi3v.serve.app import Settings, create_app, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
QUESTION, FOLLOW_UP = "What does this chart show?", "And in one word?"
MAX_TOKENS = 24
LAST_ANSWER_SETTLED = ("(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
                       " return m && m.dataset.state !== 'streaming'; })()")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; make setup does)"
        if os.environ.get("CI"):  # CI must run this test, not skip it
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a test dependency)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def ask(page, text: str):
    """Send a message; returns the locator of the answer's bubble."""
    n = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n + 1}")
    return page.locator(".msg.assistant").nth(n)


def test_chat_page_streams_answers_about_an_image(browser):
    """Two turns (the second carries the first as history), then a long answer stopped midway."""
    model = load(FIXTURES / "phi35_vision_tiny", dtype="float32")
    turn1 = [{"role": "user", "content": QUESTION, "images": [str(example_image())]}]
    want1 = model.generate(turn1, max_new_tokens=MAX_TOKENS).text
    turn2 = turn1 + [{"role": "assistant", "content": want1}, {"role": "user", "content": FOLLOW_UP}]
    want2 = model.generate(turn2, max_new_tokens=MAX_TOKENS).text
    app = create_app(model, Settings(max_batch=4, max_context=2048))
    with running(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'phi35_vision_tiny'")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.set_input_files("#file", str(example_image()))
        page.wait_for_selector("#pending img")
        for question, want in [(QUESTION, want1), (FOLLOW_UP, want2)]:
            answer = ask(page, question)
            page.wait_for_function(LAST_ANSWER_SETTLED, timeout=60_000)
            assert answer.get_attribute("data-state") == "done", answer.inner_text()
            assert answer.locator(".text").text_content() == want and want.strip()
        assert page.locator(".msg.user img").count() == 1
        speed = page.locator("#speed").inner_text()
        assert speed.endswith("tok/s") and float(speed.split()[0]) > 0

        page.fill("#max-tokens", "1200")  # long enough to be stopped while it streams
        answer = ask(page, "Tell me everything about it.")
        page.wait_for_function("[...document.querySelectorAll('.msg.assistant .text')].pop().textContent.length > 0")
        page.click("#stop")
        page.wait_for_function(LAST_ANSWER_SETTLED)
        assert answer.get_attribute("data-state") == "stopped"
        engine = app.state.service.engine
        for _ in range(200):
            if not engine.has_work():
                break
            page.wait_for_timeout(10)
        assert not engine.has_work()  # the aborted fetch cancelled the request on the server
        assert not errors
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_page.png"))
