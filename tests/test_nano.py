"""The SHIPPED phi3v-nano (src/phi3v/assets/phi3v-nano): it loads with `phi3v.load`, is small, carries its nano crop
and patch sizes, and answers held-out questions it answered in its final evaluation (so a broken loader,
processor or chat template cannot ship silently). The images are redrawn by the generator from the recipe's seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import phi3v
from phi3v.data.synth import make_sample
from phi3v.eval.metrics import synth_correct
from phi3v.recipes.nano import NANO_NUM_CROPS, NANO_SIZES, NANO_SYNTH

ASSETS = Path(phi3v.__file__).resolve().parent / "assets"
NANO = ASSETS / "phi3v-nano"
SEED = 0  # `phi3v recipe nano --seed 0` drew the data the shipped model was evaluated on
MAX_BYTES = 30_000_000
# (split, family, image k, question, answer): held-out test images the shipped model answered exactly in the
# recipe's final evaluation (reports/final-test/report.json)
# (some of them; its right price answers are its most common price answer, $4.00)
HELD_OUT: list[tuple[str, str, int, str, str]] = [
    ("test", "shapes", 0, "What colour is the diamond?", "blue"),
    ("test", "shapes", 1, "How many triangles are there?", "1"),
    ("test", "table", 3, "What is the team of Lena?", "Gold"),
    ("test", "menu", 5, "How much is a large iced latte?", "$4.00"),
    ("test", "menu", 7, "How much is a large latte?", "$4.00"),
    ("test", "chart", 7, "Which month had the highest orders?", "June"),
]
# (split, family, image k, question, the shipped model's recorded greedy prediction): wrong answers, but pinned, so a
# change in the weights, tokenizer, chat template or image processing shows up
RECORDED: list[tuple[str, str, int, str, str]] = [
    ("test", "menu", 0, "How much is a large espresso?", "$4.00"),
    ("test", "chart", 0, "What is the value for Lemon?", "14"),
    ("test", "table", 0, "What is the area of Vienna?", "163 km2"),
    ("test", "text", 0, "What text is printed in the image?", "Sning\nBasket\nBasket"),
    ("test", "shapes", 0, "How many triangles are there?", "1"),
]

pytestmark = pytest.mark.skipif(not (NANO / "model.safetensors").is_file(), reason="phi3v-nano is not shipped yet")


@pytest.fixture(scope="module")
def nano():
    return phi3v.load(NANO, dtype="float32")


def ask(model, image, question: str) -> str:
    conv = [{"role": "user", "content": question, "images": [image]}]
    return model.generate(conv, max_new_tokens=48, temperature=0).text


def test_shipped_files_size_and_config():
    assert (NANO / "model.safetensors").stat().st_size <= MAX_BYTES
    cfg = json.loads((NANO / "config.json").read_text())
    assert cfg["phi3v_model"] == "phi3v-nano" and "phi3v_random_weights" not in cfg
    vision = cfg["img_processor"]["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (NANO_SIZES.vision_image_size, NANO_SIZES.vision_patch_size)
    assert json.loads((NANO / "preprocessor_config.json").read_text())["num_crops"] == NANO_NUM_CROPS
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (NANO / name).is_file()


@pytest.mark.parametrize("split,family,k,question,answer", HELD_OUT)
def test_answers_held_out_questions(nano, split, family, k, question, answer):
    sample = make_sample(split, family, k, SEED, NANO_SYNTH)
    asked = {q.question: q for q in sample.qas}
    assert question in asked and answer in asked[question].answers  # the generator still draws the same image
    pred = ask(nano, sample.data, question)
    assert synth_correct(pred, list(asked[question].answers), asked[question].kind), pred


@pytest.mark.parametrize("split,family,k,question,prediction", RECORDED)
def test_recorded_predictions(nano, split, family, k, question, prediction):
    sample = make_sample(split, family, k, SEED, NANO_SYNTH)
    assert question in {q.question for q in sample.qas}
    assert ask(nano, sample.data, question) == prediction


@pytest.mark.xfail(strict=True, reason="the shipped phi3v-nano does not read menus reliably yet: it answers $4.00 "
                   "to this one (docs/phi3v-nano.md); XPASS means a better model shipped: drop this mark")
def test_menu_asset_question(nano):
    menu = json.loads((ASSETS / "menu.json").read_text())
    pred = ask(nano, str(ASSETS / "menu.png"), menu["question"])
    assert synth_correct(pred, [menu["answer"]], menu.get("kind", "")), pred
