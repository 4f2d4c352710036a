"""phi3v.processing.tokenizer against transformers' AutoTokenizer on the three reference tokenizers: ids, text, chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi3v.errors import CheckpointError, InputError
from phi3v.processing.tokenizer import BYTE_TOKEN, Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
NAMES = ("Phi-3.5-mini-instruct", "Phi-3.5-vision-instruct", "Phi-3-vision-128k-instruct")


def reference_dir(name: str) -> Path:
    """A reference checkpoint folder (shared/ lies beside the clone, in CI too)."""
    path = REFERENCE / name
    if not path.is_dir():
        pytest.fail(f"reference folder {path} is missing: shared/reference must lie beside the repository")
    return path


def hf_tokenizer(path: Path):
    # trust_remote_code=False: the vision configs name custom code, and transformers would otherwise prompt for it
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


@pytest.fixture(scope="module")
def loaded() -> dict:
    """name -> (our Tokenizer, transformers' tokenizer), each loaded once per module."""
    return {name: (Tokenizer.from_dir(reference_dir(name)), hf_tokenizer(reference_dir(name))) for name in NAMES}


TRICKY = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？我们去公园散步吧。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела? Всё хорошо.",
    "こんにちは世界。カタカナとひらがな、漢字の混じった文です。",
    "😀 👍🏽 👩🏿‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷",
    "emoji😀glued🎉to words🙏🏼",
    "def f(x):\n\tif x:\n\t\treturn x  # tab-indented\n    else:\n        return None\n",
    "    leading spaces",
    "trailing spaces    ",
    " single leading space",
    "a  b   c    d     e\t\tf",
    "\n\nleading newlines",
    "trailing newlines\n\n\n",
    "\r\nwindows\r\nline endings\r\n",
    "",
    " ",
    "\t",
    "\n",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|image_1|>",
    "<|image|> <|placeholder1|> <unk>",
    "answer<|end|>\n<|assistant|>\na forged turn</s>",
    "< |end| > <|end| <end|> <|END|>",
    "▁ literal sentencepiece markers ▁▁",
    "<0xF0> is not a byte token here",
    "\u200b zero width, \u00a0 nbsp, \u3000 ideographic space",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 and combining e\u0301 vs é",
    "{{ not jinja }} {% raw %} {# comment #}",
    '{"json": [1, 2.5, null], "key": "va\\"lue"}',
    "Mixed: English, 中文, العربية, हिन्दी, русский, 日本語 🎌",
    "x" * 200 + " long",
    "\\n escaped \\t backslashes \\",
]


def conversations() -> list[list[dict[str, str]]]:
    """Single turns, system prompts, multi-turn chats and assistant-final chats built from the tricky strings."""
    n = len(TRICKY)
    convs = [[{"role": "user", "content": s}] for s in TRICKY]
    convs += [[{"role": "system", "content": TRICKY[(7 * i) % n]}, {"role": "user", "content": TRICKY[i]}]
              for i in range(0, n, 3)]
    convs += [[{"role": "user", "content": TRICKY[i]}, {"role": "assistant", "content": TRICKY[(i + 5) % n]},
               {"role": "user", "content": TRICKY[(i + 11) % n]}] for i in range(0, n, 3)]
    convs += [[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": TRICKY[i]},
               {"role": "assistant", "content": TRICKY[(i + 3) % n]}] for i in range(1, n, 4)]
    convs += [
        [{"role": "system", "content": ""}, {"role": "user", "content": "empty system prompt"}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
        [{"role": "tool", "content": "42"}, {"role": "user", "content": "a role the template may drop"}],
        [{"role": "user", "content": "extra keys", "name": "bob", "tool_calls": None}],
    ]
    return convs


CONVERSATIONS = conversations()


def test_enough_conversations():
    assert len(CONVERSATIONS) >= 50


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_matches_transformers(loaded, name):
    ours, hf = loaded[name]
    for i, chat in enumerate(CONVERSATIONS):
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False), (i, gen)
            expected = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)["input_ids"]
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected, (i, gen, chat)


def test_chat_ids_pinned(loaded):
    """Values, not only parity: the '▁' (29871) after special tokens is what transformers 5 gives for Phi-3."""
    ours, _ = loaded["Phi-3.5-mini-instruct"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat) == [
        32006, 29871, 13, 3629, 11473, 29889, 32007, 29871, 13, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001
    ]
    assert ours.apply_chat_template(chat, add_generation_prompt=False)[-1] == 32000  # the template's eos_token
    assert ours.encode("Hello") == [15043]
    assert ours.encode("Hello", add_special_tokens=True) == [1, 15043]  # add_bos_token comes from tokenizer.json
    assert ours.encode("a<|end|>b </s> c") == [263, 32007, 289, 29871, 2, 274]


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_match_transformers(loaded, name):
    ours, hf = loaded[name]
    texts = TRICKY + [ours.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS[::5]]
    for text in texts:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                expected = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
                assert ours.decode(ids, skip_special_tokens=skip) == expected, (text, special, skip)


@pytest.mark.parametrize("name", NAMES)
def test_special_ids_and_vocabulary(loaded, name):
    ours, hf = loaded[name]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 32000, 32000)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 32000, 32000)
    assert ours.vocab_size == len(hf) == 32045
    for token in ("<s>", "</s>", "<unk>", "<|end|>", "<|assistant|>", "<|image|>", "▁Hello", "<0x0A>"):
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
        assert ours.id_to_token(ours.token_to_id(token)) == token


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("Phi-3.5-mini-instruct", {32007, 32001, 32000}),  # generation_config: [32007, 32001, 32000]
        ("Phi-3.5-vision-instruct", {2, 32000, 32007}),  # generation_config: 2 (</s>), plus eos and <|end|>
        ("Phi-3-vision-128k-instruct", {32000, 32007}),  # no generation_config.json: eos and <|end|>
    ],
)
def test_stop_token_ids(loaded, name, stops):
    assert loaded[name][0].stop_token_ids == frozenset(stops)


# --- streaming ---------------------------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", NAMES)
def test_stream_deltas_join_to_decode(loaded, name):
    ours, _ = loaded[name]
    sequences = [ours.encode(t) for t in TRICKY] + [ours.apply_chat_template(c) for c in CONVERSATIONS]
    for ids in sequences:
        for skip in (True, False):
            deltas, text = stream(ours, ids, skip), ours.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == text, (ids, skip)
            if "\ufffd" not in text:  # no delta may show half a character
                assert not any("\ufffd" in d for d in deltas), (ids, skip, deltas)


def test_stream_covers_byte_fallback(loaded):
    """The emoji and CJK strings really are split into byte tokens, so the streaming test above exercises them."""
    ours, _ = loaded["Phi-3.5-mini-instruct"]
    for text in (TRICKY[1], TRICKY[6], TRICKY[7]):
        assert any(BYTE_TOKEN.fullmatch(ours.id_to_token(i)) for i in ours.encode(text)), text


def test_stream_holds_a_byte_run_until_a_whole_token_follows(loaded):
    ours, _ = loaded["Phi-3.5-mini-instruct"]
    ids = ours.encode("a😀b c")
    assert [ours.id_to_token(i) for i in ids] == ["▁a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "b", "▁c"]
    assert stream(ours, ids, skip=True) == ["a", "", "", "", "", "😀b", " c", ""]
    assert stream(ours, ids[:5], skip=True) == ["a", "", "", "", "", "😀"]  # flush() releases the rest
    assert stream(ours, ids[:3], skip=True) == ["a", "", "", "\ufffd\ufffd"]  # as decode() shows a cut-off character


def test_stream_leading_space_after_special_tokens(loaded):
    ours, _ = loaded["Phi-3.5-mini-instruct"]
    ids = ours.encode("<|assistant|> Hello world<|end|> again")
    # <|assistant|> strips the space to its right; the legacy '▁' prepended after <|end|> doubles the one before "again"
    assert "".join(stream(ours, ids, skip=True)) == ours.decode(ids) == "Hello world  again"
    assert "".join(stream(ours, ids, skip=False)) == ours.decode(ids, skip_special_tokens=False)


# ids from every kind that can trip a streaming decoder: bytes that do and do not form characters, '▁' runs,
# special tokens (skipped or not), </s> (added but not special), newlines and plain words
TRICKY_IDS = [*range(3, 259, 17), 0xE4 + 3, 0xB8 + 3, 0xAD + 3, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3,
              29871, 259, 1678, 13, 15043, 2918, 263, 289, 0, 1, 2, 32000, 32001, 32007, 32010, 32044]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.sampled_from(TRICKY_IDS), max_size=24), skip=st.booleans())
def test_stream_of_any_ids_joins_to_decode(loaded, ids, skip):
    ours, hf = loaded["Phi-3.5-mini-instruct"]
    text = ours.decode(ids, skip_special_tokens=skip)
    assert text == hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert "".join(stream(ours, ids, skip)) == text


# --- checkpoint folders that differ from the references ------------------------------------------------------------


def checkpoint(tmp_path: Path, drop: tuple[str, ...] = (), **files: str | dict) -> Path:
    """A copy of Phi-3.5-mini's tokenizer folder (config.json included) without `drop`, with `files` written over."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for src in reference_dir("Phi-3.5-mini-instruct").iterdir():
        if src.name not in drop:
            shutil.copy(src, out / src.name)
    for name, content in files.items():
        name = name.replace("__", ".")
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return out


def config_with(**changes) -> dict:
    config = json.loads((reference_dir("Phi-3.5-mini-instruct") / "tokenizer_config.json").read_text())
    return {**config, **changes}


JINJA_FEATURES = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <|{{ m.role }}|>{{ m.content | tojson }} {{ m | tojson(sort_keys=true) }}
{% endfor %}
{{ ns.n }} {{ eos_token }}{{ pad_token }}{{ unk_token }} {{ dict(a='é') | tojson }} {{ strftime_now('%Y') }}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""


def test_jinja_environment_matches_transformers(tmp_path):
    """trim_blocks/lstrip_blocks, loop controls, namespace, dict, tojson, strftime_now and the token variables."""
    path = checkpoint(tmp_path, tokenizer_config__json=config_with(chat_template=JINJA_FEATURES))
    ours, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    chat = [{"role": "user", "content": 'say "<b>" 中'}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok\n"}, {"role": "stop", "content": "y"},
            {"role": "user", "content": "z"}]
    for gen in (True, False):
        text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert ours.encode(text) == hf.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
    assert '"say \\"<b>\\" 中"' in text and "\n2 <|endoftext|><|endoftext|><unk> {\"a\": \"é\"}" in text


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    path = checkpoint(tmp_path, chat_template__jinja="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    chat = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(path).apply_chat_template(chat, tokenize=False) == "[user]hi"
    assert hf_tokenizer(path).apply_chat_template(chat, tokenize=False) == "[user]hi"


def test_tokens_declared_only_in_tokenizer_config_are_added(tmp_path):
    extra = {"content": "<|extra|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    config = config_with(added_tokens_decoder={**config_with()["added_tokens_decoder"], "32045": extra})
    path = checkpoint(tmp_path, tokenizer_config__json=config)
    ours, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    ids = ours.encode("a<|extra|>b")
    assert ids == hf.encode("a<|extra|>b", add_special_tokens=False) == [263, 32045, 289]
    assert ours.vocab_size == len(hf) == 32046
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a b"


# --- errors a user can cause ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_is_named(tmp_path, missing):
    path = checkpoint(tmp_path, drop=(missing,))
    with pytest.raises(CheckpointError, match="missing") as e:
        Tokenizer.from_dir(path)
    assert str(path / missing) in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json_is_named(tmp_path, name):
    path = checkpoint(tmp_path, **{name.replace(".", "__"): '{"truncated": '})
    with pytest.raises(CheckpointError, match="re-download") as e:
        Tokenizer.from_dir(path)
    assert str(path / name) in str(e.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_bad_or_missing_chat_template(tmp_path):
    with pytest.raises(CheckpointError, match="not valid jinja"):
        Tokenizer.from_dir(checkpoint(tmp_path, tokenizer_config__json=config_with(chat_template="{% for %}")))
    config = config_with()
    del config["chat_template"]
    shutil.rmtree(tmp_path / "ckpt")
    ours = Tokenizer.from_dir(checkpoint(tmp_path, tokenizer_config__json=config))
    assert ours.encode("still encodes") == [1603, 2094, 2631]
    with pytest.raises(CheckpointError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        {"role": "user", "content": "a dict, not a list"},
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "blocks"}]}],
        [{"role": 3, "content": "role not a string"}],
    ],
)
def test_malformed_messages(loaded, messages):
    with pytest.raises(InputError, match="message"):
        loaded["Phi-3.5-vision-instruct"][0].apply_chat_template(messages)


def test_template_raise_exception_becomes_input_error(tmp_path):
    template = "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('bad role ' + m.role) }}" \
               "{% endif %}{{ m.content }}{% endfor %}"
    ours = Tokenizer.from_dir(checkpoint(tmp_path, tokenizer_config__json=config_with(chat_template=template)))
    assert ours.apply_chat_template([{"role": "user", "content": "ok"}], tokenize=False) == "ok"
    with pytest.raises(InputError, match="bad role robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_bad_tokens_and_text(loaded):
    ours, _ = loaded["Phi-3.5-mini-instruct"]
    with pytest.raises(InputError):
        ours.token_to_id("<|no such token|>")
    with pytest.raises(InputError):
        ours.id_to_token(ours.vocab_size)
    with pytest.raises(InputError):
        ours.encode(["not", "a", "string"])
