"""Image prompts: <|image_N|> tags, placeholder runs, and the token count the model must honour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from phi3v.models import config_from_dict
from phi3v.errors import InputError
from phi3v.processing.image import ImageProcessor, hd_size, num_image_tokens
from phi3v.checkpoint.load import load_causal_lm
from phi3v.processing.prompts import image_tags, tokenize_with_images, with_image_tags
from phi3v.processing.tokenizer import Tokenizer

TINY = FIXTURES / "phi35_vision_tiny"


@pytest.fixture(scope="module")
def tiny():
    raw = json.loads((TINY / "config.json").read_text())
    return load_causal_lm(TINY, config_from_dict(raw), torch.float32, raw=raw), Tokenizer.from_dir(TINY)


@pytest.mark.parametrize("text,n,message", [
    ("<|image_1|> and <|image_3|>", 2, "skip a number"),
    ("<|image_1|> <|image_1|>", 1, "appears more than once"),
    ("<|image_1|> <|image_2|>", 1, "tags 2 image(s) but 1 image(s) were given"),
    ("no tags", 1, "tags 0 image(s) but 1 image(s) were given"),
    ("<|image_2|>", 1, "skip a number"),
])
def test_bad_tags_are_clear_errors(text, n, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_tags(text, n)


def test_tags_are_prepended_when_missing():
    assert with_image_tags("What is this?", 1, 2) == "<|image_1|>\n<|image_2|>\nWhat is this?"
    assert with_image_tags("<|image_1|> here", 1, 1) == "<|image_1|> here"


def test_placeholders_and_bos_after_each_image(tiny):
    _, tok = tiny
    ids = tokenize_with_images(tok, "<|user|>\n<|image_1|>\nHi<|image_2|>x", [3, 2])
    assert ids == [1, 32010, 29871, 13, -1, -1, -1, 1, 29871, 13, 18567, -2, -2, 1, 921]


def test_images_out_of_tag_order_get_their_own_features(tiny):
    """<|image_2|> before <|image_1|>: each run gets its own image's rows (the reference would swap them)."""
    model, tok = tiny
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), rng.integers(0, 255, (200, 500, 3), dtype=np.uint8)]
    proc = ImageProcessor.from_dir(TINY)(imgs, num_crops=4)
    ids = tokenize_with_images(tok, "<|image_2|>\n<|image_1|>\nCompare.", proc["num_img_tokens"])
    with torch.no_grad():
        x = model.embed(torch.tensor([ids]), proc["pixel_values"], proc["image_sizes"])[0]
        feats = model.model.vision_embed_tokens(proc["pixel_values"], proc["image_sizes"])
    ids_t = torch.tensor(ids)
    torch.testing.assert_close(x[ids_t == -1], feats[0])
    torch.testing.assert_close(x[ids_t == -2], feats[1])


def test_placeholder_count_mismatch_is_clear(tiny):
    model, tok = tiny
    proc = ImageProcessor.from_dir(TINY)([np.zeros((50, 50, 3), np.uint8)], num_crops=4)
    ids = tokenize_with_images(tok, "<|image_1|>hi", [proc["num_img_tokens"][0] - 3])
    with pytest.raises(InputError, match="image placeholder tokens but the images give"):
        model.embed(torch.tensor([ids]), proc["pixel_values"], proc["image_sizes"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    long_side=st.integers(1, 4000),
    log_ratio=st.floats(np.log(1 / 30), np.log(30)),
    num_crops=st.integers(1, 16),
)
def test_token_count_equals_feature_rows(tiny, long_side, log_ratio, num_crops):
    """For any size and aspect ratio 1:30..30:1, the processor's count is the number of rows the model makes."""
    model, _ = tiny
    ratio = float(np.exp(log_ratio))
    w, h = (long_side, max(1, round(long_side / ratio))) if ratio >= 1 else (max(1, round(long_side * ratio)), long_side)
    try:
        hd_h, hd_w = hd_size(w, h, num_crops)
    except InputError:  # too elongated for this num_crops (the reference crashes): a clear error is the contract
        return
    img = np.full((h, w, 3), 127, np.uint8)
    proc = ImageProcessor.from_dir(TINY)([img], num_crops=num_crops)
    assert proc["image_sizes"].tolist() == [[hd_h, hd_w]]
    with torch.no_grad():
        rows = model.model.vision_embed_tokens(proc["pixel_values"], proc["image_sizes"])[0]
    assert rows.shape[0] == proc["num_img_tokens"][0] == num_image_tokens(hd_h, hd_w)
    assert torch.isfinite(rows).all()
