"""render(tokenizer, conversation) -> (ids, loss_mask): exact masks, and the prompt part equals prepare()'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phi3v
from phi3v.checkpoint.random import create_random
from phi3v.errors import InputError
from phi3v.processing.image import hd_size, num_image_tokens
from phi3v.processing.render import render

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"
VISION_LIKE = SHARED / "reference" / "Phi-3.5-vision-instruct"
SIZES = dict(layers=2, hidden=64, heads=4, intermediate=96, dtype="float32")

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, I think."},
]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return phi3v.load(create_random(TEXT_LIKE, tmp_path_factory.mktemp("text"), seed=0, **SIZES), dtype="float32")


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    return phi3v.load(create_random(VISION_LIKE, tmp_path_factory.mktemp("vis"), seed=0, **SIZES), dtype="float32")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray((np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)).save(path)
    return path


def pieces(tok, ids, mask):
    return [tok.decode([t], skip_special_tokens=False) for t, m in zip(ids, mask) if m]


def test_text_mask_is_assistant_turns_with_their_end(text_model):
    tok = text_model.tokenizer
    ids, mask = render(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    # <|assistant|> strips the newline after it, so each answer starts with the bare '▁' piece (29871)
    assert pieces(tok, ids, mask) == ["", "4", "<|end|>", "", "6", ",", "I", "think", ".", "<|end|>"]
    assert ids[-1] == tok.eos_token_id and mask[-1] == 0  # end-of-text is not trained
    assert len(ids) == len(mask) and set(mask) == {0, 1}


@pytest.mark.parametrize("upto", [2, 4])
def test_text_prompt_part_equals_prepare(text_model, upto):
    tok = text_model.tokenizer
    prompt = text_model.prepare(CHAT[:upto]).ids
    gen, gen_mask = render(tok, CHAT[:upto], add_generation_prompt=True)
    assert gen == prompt and not any(gen_mask)
    full, mask = render(tok, CHAT[:upto + 1])
    assert full[:len(prompt)] == prompt and mask[len(prompt)] == 1
    assert sum(mask[:len(prompt)]) == (0 if upto == 2 else 3)  # the earlier answer "4" <|end|> stays trained


def test_vision_prompt_part_equals_prepare(vision_model, image):
    tok = vision_model.tokenizer
    n = num_image_tokens(*hd_size(300, 200, vision_model.processor.num_crops))
    conv = [{"role": "user", "content": "Describe.", "images": [str(image)]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    prompt = vision_model.prepare(conv[:3]).ids
    assert render(tok, conv[:3], [n], vision=True, add_generation_prompt=True)[0] == prompt
    ids, mask = render(tok, conv, [n], vision=True)
    assert ids[:len(prompt)] == prompt
    assert ids.count(-1) == n and all(m == 0 for t, m in zip(ids, mask) if t < 0)
    assert ids.count(tok.bos_token_id) == 2  # one BOS per chunk around the image, as the reference processor
    assert pieces(tok, ids, mask) == ["A", "picture", ".", "<|end|>", "No", ".", "<|end|>"]


def test_tagged_content_equals_images_lists(vision_model):
    tok = vision_model.tokenizer
    tagged = [{"role": "user", "content": "<|image_1|>\nHi"}, {"role": "assistant", "content": "Yo"}]
    listed = [{"role": "user", "content": "Hi", "images": ["x.png"]}, {"role": "assistant", "content": "Yo"}]
    assert render(tok, tagged, [5], vision=True) == render(tok, listed, [5], vision=True)


def test_render_errors(text_model, vision_model):
    with pytest.raises(InputError, match="starts with an assistant"):
        render(text_model.tokenizer, [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="text model"):
        render(text_model.tokenizer, CHAT, [10])
    with pytest.raises(InputError, match="image"):
        render(vision_model.tokenizer, [{"role": "user", "content": "<|image_1|> x"},
                                        {"role": "assistant", "content": "y"}], [3, 4], vision=True)
