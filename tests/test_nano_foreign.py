"""The SHIPPED phi3v-nano on menus and bar charts drawn by code that shares nothing with `phi3v synth`: another
layout (a price grid under a MENU title; bars with their values above them), Pillow's default font, plain colours,
no augmentation. The issue asks that the model still answers most such questions; the measured count is pinned, so
a regression shows up, and "most" is a strict xfail until a model that reads them ships."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

import phi3v
from phi3v.eval.metrics import synth_correct

NANO = Path(phi3v.__file__).resolve().parent / "assets" / "phi3v-nano"
DRINKS = ("Latte", "Mocha", "Espresso", "Cappuccino", "Americano", "Flat White", "Chai Latte", "Hot Chocolate")
LABELS = (("Apples", "Pears", "Plums", "Grapes", "Kiwis"), ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
          ("Lions", "Tigers", "Bears", "Wolves", "Foxes"))
N_IMAGES = 8  # of each kind; two questions each
# right answers of the shipped model out of 2 * N_IMAGES, per kind (measured on the shipped file, greedy)
MEASURED = {"menu": 0, "chart": 0}  # every menu answer "$4.00", every chart answer "14"

pytestmark = pytest.mark.skipif(not (NANO / "model.safetensors").is_file(), reason="phi3v-nano is not shipped yet")


def _font(size: int):
    return ImageFont.load_default(size)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def draw_menu(rng: random.Random) -> tuple[bytes, list[tuple[str, str]]]:
    """A MENU title, a header row of sizes, three drinks with a price per size; two price questions."""
    sizes = rng.choice((("Small", "Large"), ("Small", "Medium", "Large")))
    drinks = rng.sample(DRINKS, 3)
    prices = {(d, s): f"${rng.randrange(200, 600, 25) / 100:.2f}" for d in drinks for s in sizes}
    img = Image.new("RGB", (272, 176), "white")
    d = ImageDraw.Draw(img)
    d.text((136, 10), "MENU", fill="black", font=_font(18), anchor="mt")
    x0, dx, y = 112, 54 if len(sizes) == 3 else 74, 48
    small = _font(13)
    for k, s in enumerate(sizes):
        d.text((x0 + k * dx, y), s, fill="black", font=small)
    d.line((10, y + 20, 262, y + 20), fill="black")
    for r, drink in enumerate(drinks):
        yy = y + 30 + 28 * r
        d.text((10, yy), drink, fill="black", font=small)
        for k, s in enumerate(sizes):
            d.text((x0 + k * dx, yy), prices[(drink, s)], fill="black", font=small)
    asked = rng.sample([(dr, s) for dr in drinks for s in sizes], 2)
    return _png(img), [(f"How much is a {s.lower()} {dr.lower()}?", prices[(dr, s)]) for dr, s in asked]


def draw_chart(rng: random.Random) -> tuple[bytes, list[tuple[str, str]]]:
    """Four bars with their values printed above them and labels below; two value questions."""
    labels = rng.sample(rng.choice(LABELS), 4)
    values = [rng.randrange(10, 96) for _ in labels]
    img = Image.new("RGB", (272, 208), "white")
    d = ImageDraw.Draw(img)
    small, base, top = _font(12), 180, 40
    for k, (label, v) in enumerate(zip(labels, values)):
        x = 20 + 64 * k
        h = round((base - top) * v / 100)
        d.rectangle((x + 8, base - h, x + 48, base), fill=(70, 110, 170))
        d.text((x + 28, base - h - 4), str(v), fill="black", font=small, anchor="mb")
        d.text((x + 28, base + 6), label, fill="black", font=small, anchor="mt")
    d.line((12, base, 262, base), fill="black")
    asked = rng.sample(range(4), 2)
    return _png(img), [(f"What is the value for {labels[i]}?", str(values[i])) for i in asked]


def score(model, kind: str) -> tuple[int, list[tuple[str, str, str]]]:
    draw = {"menu": draw_menu, "chart": draw_chart}[kind]
    rng = random.Random(f"foreign/{kind}")
    right, rows = 0, []
    for _ in range(N_IMAGES):
        png, qas = draw(rng)
        for question, answer in qas:
            conv = [{"role": "user", "content": question, "images": [png]}]
            pred = model.generate(conv, max_new_tokens=12, temperature=0).text
            right += synth_correct(pred, [answer], "price" if kind == "menu" else "value")
            rows.append((question, answer, pred))
    return right, rows


@pytest.fixture(scope="module")
def scores():
    model = phi3v.load(NANO, dtype="float32")
    return {kind: score(model, kind) for kind in ("menu", "chart")}


def test_the_drawings_are_deterministic_and_hold_their_answers():
    a, b = draw_menu(random.Random("x")), draw_menu(random.Random("x"))
    assert a == b and a[0][:4] == b"\x89PNG"
    png, qas = draw_chart(random.Random("y"))
    assert len(qas) == 2 and all(ans.isdigit() for _, ans in qas)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (272, 208) and len(set(im.convert("RGB").getdata())) > 2  # bars and text were drawn


@pytest.mark.parametrize("kind", ["menu", "chart"])
def test_foreign_images_score_at_least_the_measured_count(scores, kind):
    right, rows = scores[kind]
    assert right >= MEASURED[kind], rows


@pytest.mark.xfail(strict=True, reason="the shipped phi3v-nano does not yet answer most questions about images drawn "
                   "by other code (docs/phi3v-nano.md); XPASS means a better model shipped: drop this mark")
def test_foreign_images_mostly_answered(scores):
    right = sum(r for r, _ in scores.values())
    assert right > N_IMAGES * 2  # more than half of the 4 * N_IMAGES questions
