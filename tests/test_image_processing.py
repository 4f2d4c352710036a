"""The image processor against the reference's golden fixtures, plus loading errors, input kinds and colour modes."""

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from phi3v.errors import CheckpointError, InputError
from phi3v.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_SIZE,
    DEFAULT_NUM_CROPS,
    ImageProcessor,
    hd_size,
    hd_transform,
    load_image,
    num_image_tokens,
    tokens_per_side,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "phi3v"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


def fixture_cases() -> list[tuple[str, str]]:
    if not FIXTURES.is_dir():
        return []
    index = json.loads((FIXTURES / "index.json").read_text())
    return [(model, case) for model, info in index["models"].items() for case in info["cases"]]


def processed(image, num_crops=4) -> torch.Tensor:
    return ImageProcessor(num_crops=num_crops)(image)["pixel_values"]


# --------------------------------------------------------------------------- golden fixtures

@needs_fixtures
@pytest.mark.parametrize("model,case", fixture_cases(), ids=lambda v: v)
def test_matches_reference_fixture(model, case):
    folder = FIXTURES / model / case
    manifest = json.loads((folder / "manifest.json").read_text())
    if not manifest["images"]:
        assert "image_sizes" not in manifest  # text-only case: the reference never ran the image processor
        return
    want = load_file(folder / "tensors.safetensors")
    images = [Image.open(folder / img["file"]) for img in manifest["images"]]  # as loaded: A6 has RGBA and L
    assert [im.mode for im in images] == [img["mode"] for img in manifest["images"]]

    proc = ImageProcessor.from_dir(FIXTURES / model)
    assert proc.num_crops == manifest["num_crops"]  # preprocessor_config.json holds what the cases used
    out = proc(images, num_crops=manifest["num_crops"])

    assert out["image_sizes"].dtype == torch.int64 and out["image_sizes"].tolist() == want["image_sizes"].tolist()
    assert out["num_img_tokens"] == want["num_img_tokens"].tolist() == manifest["num_img_tokens"]
    assert out["pixel_values"].dtype == torch.float32
    assert list(out["pixel_values"].shape) == manifest["pixel_values_shape"]
    from_size = [proc.num_tokens_for_size(img["width"], img["height"]) for img in manifest["images"]]
    assert from_size == manifest["num_img_tokens_from_image_size"]
    for (h, w), n_real in zip(out["image_sizes"].tolist(), manifest["real_crops_per_image"]):
        assert (h // CROP_SIZE) * (w // CROP_SIZE) == n_real
    if "pixel_values" in want:  # A1 and B1
        diff = (out["pixel_values"] - want["pixel_values"]).abs().max().item()
        print(f"{case}: pixel_values max abs diff {diff:.3e}")
        torch.testing.assert_close(out["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)


@needs_fixtures
def test_rgba_and_l_fixture_images_equal_their_rgb_conversion():
    folder = FIXTURES / "phi3_vision_tiny" / "A6_rgba_360x270_gray_256x320"
    rgba, grey = (Image.open(folder / f"image_{k}.png") for k in (1, 2))
    rgba_px, grey_px = np.array(rgba), np.array(grey)
    assert (rgba_px[..., 3] == 0).any()  # the transparent band: its stored colour must survive
    np.testing.assert_array_equal(np.array(load_image(rgba)), rgba_px[..., :3])
    np.testing.assert_array_equal(np.array(load_image(grey)), np.repeat(grey_px[..., None], 3, axis=2))
    assert torch.equal(processed(rgba), processed(np.ascontiguousarray(rgba_px[..., :3])))


# --------------------------------------------------------------------------- sizes and token counts

def reference_hd_size(width, height, hd_num):
    """Transcription of the reference's calc_hd_transform_size (returns (width, height), as it does)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = int(scale * 336)
    new_height = int(new_width / ratio)
    padded_height = int(np.ceil(new_height / 336) * 336)
    return (padded_height, new_width) if transposed else (new_width, padded_height)


@st.composite
def sizes(draw, max_side):
    """(width, height, num_crops) with sides in 1..max_side and aspect ratio within 1:30..30:1."""
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(max(1, math.ceil(width / 30)), min(max_side, width * 30)))
    return width, height, draw(st.integers(1, 16))


@settings(max_examples=300, deadline=None)
@given(sizes(max_side=4000))
def test_hd_size_matches_reference_formula(size):
    width, height, num_crops = size
    h, w = hd_size(width, height, num_crops)
    assert (w, h) == reference_hd_size(width, height, num_crops)
    assert h % CROP_SIZE == 0 and w % CROP_SIZE == 0
    assert 1 <= (h // CROP_SIZE) * (w // CROP_SIZE) <= num_crops
    side = tokens_per_side()  # grid: h_c*side token rows of w_c*side tokens + newline; separator; global + newlines
    assert num_image_tokens(h, w) == (h // CROP_SIZE * side) * (w // CROP_SIZE * side + 1) + 1 + side * (side + 1)


@settings(max_examples=25, deadline=None)
@given(sizes(max_side=1200))
def test_hd_size_agrees_with_processing(size):
    width, height, num_crops = size
    out = ImageProcessor(num_crops=num_crops)(Image.new("RGB", (width, height), (10, 200, 30)))
    h, w = out["image_sizes"][0].tolist()
    assert (h, w) == hd_size(width, height, num_crops)
    assert out["num_img_tokens"] == [num_image_tokens(h, w)]
    n_real = (h // CROP_SIZE) * (w // CROP_SIZE)
    assert n_real <= num_crops and out["pixel_values"].shape == (1, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    assert out["pixel_values"][0, 1 + n_real:].abs().sum() == 0  # padding crops are zeros


def test_token_count_constants():
    assert tokens_per_side() == 12 and tokens_per_side(56, 14) == 2
    assert num_image_tokens(336, 336) == 2 * 144 + 1 + 2 * 12
    with pytest.raises(InputError, match="not a positive multiple"):
        num_image_tokens(1000, 336)


def test_too_elongated_image_is_refused():
    assert hd_size(4000, 1, 16) == (336, 16 * 336)
    with pytest.raises(InputError, match="too elongated"):
        hd_size(4000, 1, num_crops=1)
    with pytest.raises(InputError, match="num_crops must be a positive integer"):
        hd_size(10, 10, num_crops=0)


# --------------------------------------------------------------------------- HD transform details

@pytest.mark.parametrize("portrait", [False, True])
@pytest.mark.parametrize("landscape_size,num_crops,side,before,after", [
    ((320, 256), 16, 1344, 134, 135),  # scale 4: resized to 1344x1075, 269 white lines
    ((21, 19), 1, 336, 16, 17),  # int(336 / (21 / 19)) = 303 in float, not 336 * 19 // 21 = 304: 33 white lines
])
def test_padding_is_white_centred_across_the_short_side(portrait, landscape_size, num_crops, side, before, after):
    size = landscape_size[::-1] if portrait else landscape_size
    hd = np.array(hd_transform(Image.new("RGB", size, (0, 0, 0)), num_crops))
    lines = hd.transpose(1, 0, 2) if portrait else hd  # iterate over the padded axis
    assert hd.shape == (side, side, 3)
    white = (lines == 255).all(axis=(1, 2))
    assert white[:before].all() and not white[before:side - after].any() and white[side - after:].all()


def test_portrait_is_resized_transposed():
    # the reference resizes the transposed image; PIL's two-pass resize rounds between passes, so resizing the portrait
    # directly differs by 1 in about a quarter of the pixels (no stored portrait pixel_values would catch that)
    portrait = Image.fromarray(np.random.default_rng(3).integers(0, 256, (500, 300, 3), dtype=np.uint8))
    landscape_hd = np.array(hd_transform(portrait.transpose(Image.Transpose.TRANSPOSE), 16))
    np.testing.assert_array_equal(np.array(hd_transform(portrait, 16)), landscape_hd.transpose(1, 0, 2))


def test_global_view_and_crops():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = ImageProcessor(num_crops=4)(image)
    (h, w), pv = out["image_sizes"][0].tolist(), out["pixel_values"][0]
    raw = torch.from_numpy(np.array(hd_transform(image, 4))).permute(2, 0, 1).float() / 255
    hd = (raw - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(pv[0], torch.nn.functional.interpolate(hd[None], (336, 336), mode="bicubic")[0])
    for r in range(h // 336):  # row-major
        for c in range(w // 336):
            assert torch.equal(pv[1 + r * (w // 336) + c], hd[:, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336])


# --------------------------------------------------------------------------- loading: sources and errors

@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_every_source_kind_gives_identical_pixel_values(png):
    data = png.read_bytes()
    sources = [png, str(png), data, bytearray(data), "data:image/png;base64," + base64.b64encode(data).decode(),
               np.array(Image.open(png)), Image.open(png)]
    want = processed(Image.open(png).convert("RGB"))
    for src in sources:
        assert torch.equal(processed(src), want), type(src)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    with pytest.raises(InputError, match=r"image bytes \(11 bytes\) is not an image"):
        load_image(b"hello world")
    (tmp_path / "notes.png").write_text("not a png")
    with pytest.raises(InputError, match="notes.png is not an image"):
        load_image(tmp_path / "notes.png")


def test_truncated_png(png, tmp_path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.png is truncated or corrupt"):
        load_image(cut)


def test_decompression_bomb(png, monkeypatch):
    with pytest.raises(InputError, match=r"is 60x40 = 2400 pixels, over the limit of 1000"):
        load_image(png, max_pixels=1000)
    with pytest.raises(InputError, match="over the limit of 1000"):
        ImageProcessor(max_pixels=1000)(np.zeros((40, 60), np.uint8))
    for pil_limit in (2000, 1000):  # PIL warns above its limit and errors above twice it: both become InputError
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with pytest.raises(InputError, match="decompression-bomb limit"):
            load_image(png)


def test_bad_data_url():
    with pytest.raises(InputError, match="invalid base64"):
        load_image("data:image/png;base64,not*base64!")
    with pytest.raises(InputError, match="bad data URL"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(InputError, match=r"data URL .* is not an image"):
        load_image("data:image/png;base64," + base64.b64encode(b"hello").decode())


def test_other_bad_sources():
    with pytest.raises(InputError, match="expected uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="is empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match="unsupported image source of type int"):
        load_image(3)
    with pytest.raises(InputError, match="not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(InputError, match="no images"):
        ImageProcessor()([])


# --------------------------------------------------------------------------- colour modes (quirk 6)

def test_rgba_drops_alpha_without_compositing():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # pure red, fully transparent: stays red (compositing on white would give white)
    np.testing.assert_array_equal(np.array(load_image(Image.fromarray(rgba))), rgba[..., :3])
    assert torch.equal(processed(rgba), processed(np.ascontiguousarray(rgba[..., :3])))


def test_grey_is_copied_to_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_array_equal(np.array(load_image(grey)), np.stack([grey] * 3, axis=-1))
    assert torch.equal(processed(Image.fromarray(grey)), processed(np.stack([grey] * 3, axis=-1)))


def test_palette_and_cmyk_use_pil_conversion():
    p = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    assert np.array_equal(np.array(load_image(p)), np.array(p.convert("RGB")))
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    assert np.array(load_image(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255]]]
    assert torch.equal(processed(cmyk), processed(cmyk.convert("RGB")))


# --------------------------------------------------------------------------- from_dir

@needs_fixtures
def test_from_dir_reads_preprocessor_config():
    proc = ImageProcessor.from_dir(FIXTURES / "phi35_vision_tiny")
    assert (proc.num_crops, proc.image_mean, proc.image_std) == (4, CLIP_MEAN, CLIP_STD)
    assert ImageProcessor.from_dir(FIXTURES / "phi35_vision_tiny", num_crops=16).num_crops == 16


def test_from_dir_defaults_and_errors(tmp_path):
    assert ImageProcessor.from_dir(tmp_path) == ImageProcessor(num_crops=DEFAULT_NUM_CROPS)
    assert ImageProcessor.from_dir(tmp_path, num_crops=4) == ImageProcessor(num_crops=4)
    with pytest.raises(CheckpointError, match="folder not found"):
        ImageProcessor.from_dir(tmp_path / "missing")
    (tmp_path / "preprocessor_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ImageProcessor.from_dir(tmp_path)
