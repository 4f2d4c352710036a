"""Property-based fuzzing (hypothesis, bounded in examples and sizes) of what strangers' bytes reach: the image loader
and the server's header reader, the <|image_N|> tag parser, the chat template renderer and literal text, and the
safetensors header reader. Only the project's own error types may come out."""

import base64
import io
import json
import struct
import warnings
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import FIXTURES
from phi3v.checkpoint.safetensors import SafetensorsFile, save_file
from phi3v.errors import CheckpointError, InputError
from phi3v.processing.image import ImageProcessor, load_image
from phi3v.processing.prompts import image_tags, tokenize_with_images, with_image_tags
from phi3v.processing.tokenizer import Tokenizer, literal
from phi3v.serve.protocol import APIError, read_image_header

MAX_PIXELS = 1 << 20  # small, so that no example can allocate much
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
FORMATS = {"PNG": "RGB", "JPEG": "RGB", "GIF": "P", "WEBP": "RGB", "BMP": "RGB", "TIFF": "RGB"}
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I", "F", "LA", "I;16", "YCbCr"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(FIXTURES / "phi35_vision_tiny")


def encoded(fmt: str, mode: str, size=(13, 7)) -> bytes:
    buf = io.BytesIO()
    image = Image.linear_gradient("L").resize(size).convert(mode)
    image.save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = {fmt: encoded(fmt, mode) for fmt, mode in FORMATS.items()}


def loads_or_refuses(data: bytes) -> None:
    """load_image gives an RGB image or InputError; the server's header reader gives a size or a 4xx APIError."""
    try:
        image = load_image(data, MAX_PIXELS)
        assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS
    except InputError:
        pass
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    try:
        sized = read_image_header(url, (), MAX_PIXELS, 1)
        assert 0 < sized.width * sized.height <= MAX_PIXELS
    except APIError as e:
        assert e.status in (400, 413)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    loads_or_refuses(data)


@FUZZ
@given(st.sampled_from(sorted(FORMATS)), st.data())
def test_truncated_and_corrupted_files(fmt, data):
    raw = bytearray(SAMPLES[fmt])
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 3))):  # and a few flipped bytes
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    loads_or_refuses(bytes(raw))


def png_declaring(width: int, height: int) -> bytes:
    raw = bytearray(SAMPLES["PNG"])
    ihdr = bytearray(raw[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    raw[16:29], raw[29:33] = ihdr, struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(raw)


@FUZZ
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_huge_declared_sizes_are_refused_from_the_header(width, height):
    data = png_declaring(width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        loads_or_refuses(data)
    if width * height > MAX_PIXELS:
        with pytest.raises(InputError):  # from the header (ours or PIL's bomb limit), before any data is read
            load_image(data, MAX_PIXELS)
        with pytest.raises(APIError) as e:
            read_image_header("data:image/png;base64," + base64.b64encode(data).decode(), (),
                              MAX_PIXELS, 1)
        assert e.value.status in (400, 413)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG"])
def test_odd_modes_load_as_rgb_or_refuse(fmt, mode):
    try:
        raw = encoded(fmt, mode)
    except (OSError, ValueError, KeyError):  # PIL cannot write this mode in this format
        return
    loads_or_refuses(raw)
    image = load_image(raw, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (13, 7)


@FUZZ
@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 16))
def test_token_count_from_the_header_is_the_processors(width, height, num_crops):
    p = ImageProcessor(num_crops=num_crops)
    try:
        n = p.num_tokens_for_size(width, height)
    except InputError:  # too elongated for num_crops
        return
    assert n > 0


def pieces(alphabet: list[str], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(alphabet), max_size=max_size).map("".join)


TAGGY = pieces(list("<|>image_0123456789 x\n") + ["<|image_1|>", "<|image_2|>", "<|image_", "|>"], 40)


@FUZZ
@given(TAGGY, st.integers(0, 4))
def test_image_tag_parser(text, n_images):
    try:
        order = image_tags(text, n_images)
    except InputError:
        return
    assert sorted(order) == list(range(1, n_images + 1))
    tagged = with_image_tags(text, 1, n_images)
    assert image_tags(tagged, n_images) == order


HOSTILE = pieces(list("{}%#<>|/\\'\"\n\t ab") + ["{{", "}}", "{%", "%}", "<|end|>", "<|user|>", "<|assistant|>",
                                                 "<s>", "</s>", "<|image_1|>", "\ue000", "\ue001", "\ue002",
                                                 "\ud800", "\x00", "é😀"], 30)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "{{x}}", ""]), HOSTILE), min_size=1,
                max_size=3))
def test_chat_template_with_hostile_strings(tokenizer, messages):
    msgs = [{"role": r, "content": c} for r, c in messages]
    try:
        ids = tokenizer.apply_chat_template(msgs)
    except InputError:
        return
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)


@FUZZ
@given(HOSTILE, HOSTILE)
def test_literal_text_never_becomes_control_tokens(tokenizer, a, b):
    """Whatever a user writes, inside literal() it adds no added token: the template's own are all there are."""
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": literal(a)},
                                             {"role": "assistant", "content": literal(b)}])
        counts = tokenize_with_images(tokenizer, tokenizer.apply_chat_template(
            [{"role": "user", "content": literal(a)}], tokenize=False), [])
    except InputError:  # a lone surrogate
        assert "\ud800" in a + b
        return
    want = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    added = tokenizer.added_token_ids
    assert [i for i in ids if i in added] == [i for i in want if i in added]
    assert all(i >= 0 for i in counts)  # no <|image_N|> tag was seen


# --------------------------------------------------------------------------- safetensors headers

def safetensors_bytes(header, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def opens_or_refuses(tmp_path, raw: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        st_file = SafetensorsFile(path)
    except CheckpointError:
        return
    for k in st_file.keys():
        try:
            t = st_file.get(k)
        except CheckpointError:  # an unsupported dtype
            continue
        assert isinstance(t, torch.Tensor)


ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "X9", 3, None]),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just("3"), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 80), min_size=0, max_size=3), st.just([0, 2**70]),
                              st.just(["0", "4"]), st.none())})


@FUZZ
@given(st.dictionaries(st.text(max_size=4), st.one_of(ENTRY, st.integers(), st.text(max_size=3)), max_size=3),
       st.binary(max_size=64))
def test_safetensors_headers(tmp_path_factory, header, data):
    opens_or_refuses(tmp_path_factory.mktemp("st"), safetensors_bytes(header, data))


@FUZZ
@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_safetensors_garbage(tmp_path_factory, header, declared):
    opens_or_refuses(tmp_path_factory.mktemp("st"), safetensors_bytes(header, b"", declared))


@pytest.mark.parametrize("header", [b"[1, 2]", b'"x"', b"1e999999", b"[" * 100_000, b'{"__metadata__": 5}',
                                    b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}',
                                    b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'])
def test_safetensors_known_bad_headers(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    if header == b'{"__metadata__": 5}':
        assert SafetensorsFile(path).meta == {}
        return
    with pytest.raises(CheckpointError):
        SafetensorsFile(path)


def test_safetensors_written_files_still_open(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.zeros(0), "c": torch.ones(5, 1)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "ok.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.get(k), v)


BENIGN = pieces(list("ab c\n\t.,<>|xé中😀") + ["  ", "<|", "|>", "<0x0A>", "\n\n"], 16)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), BENIGN), min_size=1, max_size=3),
       st.booleans())
def test_literal_text_encodes_as_plain_text_when_it_holds_no_control_tokens(tokenizer, messages, bos):
    """So that marking every message literal changes nothing for ordinary messages (the server's answers stay equal
    to the Python API's)."""
    plain = [{"role": r, "content": c} for r, c in messages]
    marked = [{"role": r, "content": literal(c)} for r, c in messages]
    assert tokenizer.encode(tokenizer.apply_chat_template(marked, tokenize=False), bos) == tokenizer.encode(
        tokenizer.apply_chat_template(plain, tokenize=False), bos)
