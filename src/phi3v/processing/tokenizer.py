"""Tokenizer and chat template of a checkpoint folder, giving the ids and text of transformers 5 `AutoTokenizer`.

transformers 5 loads Phi-3 tokenizers (model types phi3, phi3_v, phimoe) as a plain `TokenizersBackend`: tokenizer.json
is used verbatim, so its legacy `Prepend("▁")` normalizer puts a '▁' after every special token (`<|user|>\\n` is
[32010, 29871, 13]) although tokenizer_config.json says `legacy: false`, and `add_bos_token`/`add_eos_token` are
dropped: tokenizer.json's post-processor alone decides what `add_special_tokens=True` adds. This module does the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from ..models.config import read_json
from ..errors import CheckpointError, InputError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # written by transformers >= 4.50; it wins over tokenizer_config's
END_OF_TURN = "<|end|>"  # Phi-3 chat models end every turn with it
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what templates see as variables
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece byte fallback: one token per UTF-8 byte
# Private-use code points that mark text to keep as text (see `literal`); `_LITERAL_BREAK` follows every '<' inside,
# so that neither a special token nor an <|image_N|> tag can match there before encode() sees the marks.
LITERAL_OPEN, LITERAL_CLOSE, _LITERAL_BREAK = "\ue000", "\ue001", "\ue002"
_LITERAL_MARKS = re.compile("[\ue000-\ue002]")


def literal(text: str) -> str:
    """`text` marked so that `Tokenizer.encode` keeps it text: special-token strings (`<|end|>`, `<|assistant|>`)
    and `<|image_N|>` tags in it become ordinary tokens, e.g. for untrusted chat messages."""
    return LITERAL_OPEN + _LITERAL_MARKS.sub("", text).replace("<", "<" + _LITERAL_BREAK) + LITERAL_CLOSE


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Text without the literal marks, and the [start, end) spans of it that were marked literal."""
    plain, spans, start = [], [], None
    n = 0
    for part in re.split("([\ue000-\ue002])", text):
        if part == LITERAL_OPEN and start is None:
            start = n
        elif part == LITERAL_CLOSE and start is not None:
            spans.append((start, n))
            start = None
        elif part and part not in (LITERAL_OPEN, LITERAL_CLOSE, _LITERAL_BREAK):
            plain.append(part)
            n += len(part)
    if start is not None:
        spans.append((start, n))
    return "".join(plain), spans


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is missing: copy {path.name} from the original Hugging Face checkpoint into {path.parent}"
    )


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    """The object in a JSON file; {} for an optional file that is absent."""
    if not path.is_file():
        if required:
            raise _missing(path)
        return {}
    return read_json(path, path.name)


def _content(token: str | Mapping | None) -> str | None:
    """The text of a special token, written either as a string or as a serialized AddedToken."""
    return token.get("content") if isinstance(token, Mapping) else token


def _load_backend(path: Path) -> Backend:
    if not path.is_file():
        raise _missing(path)
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for both bad JSON and bad contents
        raise CheckpointError(f"{path} cannot be loaded ({e}): re-download or re-create it") from e


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping, unlike jinja's own
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates, without attributes that lead to Python internals."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` for templates, refusing underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")


def _compile_chat_template(source: str, where: Path) -> jinja2.Template:
    """Compile in the environment of transformers' `_cached_compile_jinja_template`: same options and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template of {where} is not valid jinja ({e}): fix or remove it") from e


def _chat_template_source(path: Path, config: Mapping) -> str | None:
    file = path / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """A copy of `messages` without None values (as transformers does), or InputError saying what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"message {i} needs a string {key!r}, got {message.get(key)!r}")
        chat.append(message)
    return chat


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and the ids that end a generation."""

    def __init__(self, backend: Backend, special_tokens: dict[str, str], chat_template: jinja2.Template | None,
                 generation_eos: Iterable[int] = (), where: Path | None = None):
        self._backend = backend
        self._special_tokens = special_tokens  # {"bos_token": "<s>", ...}: the template's variables
        self._chat_template = chat_template
        self._where = where
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_ids = frozenset(i for t, i in backend.get_vocab().items() if BYTE_TOKEN.fullmatch(t))
        end = backend.token_to_id(END_OF_TURN)
        stops = {*generation_eos, self.eos_token_id, end}
        self._stop_token_ids = frozenset(i for i in stops if i is not None)
        self._pieces: list[tuple[str | None, bytes]] | None = None
        self._plain_backend: Backend | None = None  # the same tokenizer without added tokens (for literal text)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (required), special_tokens_map.json, generation_config.json."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder: pass the checkpoint folder that holds {TOKENIZER_FILE}")
        backend = _load_backend(path / TOKENIZER_FILE)
        config = _read_json(path / CONFIG_FILE, required=True)
        special = {k: _content(config.get(k)) for k in NAMED_SPECIAL_TOKENS}
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only in this case
            special_map = _read_json(path / SPECIAL_TOKENS_MAP_FILE, required=False)
            special.update({k: _content(v) for k, v in special_map.items() if k in NAMED_SPECIAL_TOKENS})
        special = {k: v for k, v in special.items() if v is not None}

        # Like transformers, add the tokens that tokenizer_config.json declares but tokenizer.json lacks.
        by_id = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
        declared = [AddedToken(**{k: v for k, v in t.items() if k != "__type"}) for _, t in by_id]
        declared += [AddedToken(t, special=True, normalized=False) for t in special.values()]
        missing = {t.content: t for t in declared if backend.token_to_id(t.content) is None}
        backend.add_tokens(list(missing.values()))

        generation = _read_json(path / GENERATION_CONFIG_FILE, required=False)
        eos = generation.get("eos_token_id", [])
        source = _chat_template_source(path, config)
        template = None if source is None else _compile_chat_template(source, path)
        return cls(backend, special, template, eos if isinstance(eos, list) else [eos], where=path)

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (`len(hf_tokenizer)`, not transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """generation_config.json's eos ids, the tokenizer's eos and `<|end|>`: generation stops on any of them."""
        return self._stop_token_ids

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise InputError(f"{token!r} is not a token of this tokenizer")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if token is None:
            raise InputError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return token

    def vocab_pieces(self) -> list[tuple[str | None, bytes]]:
        """What each token id adds when decoded, as (text, UTF-8 bytes): the sentencepiece piece with '▁' as a space,
        or a byte-fallback token's one byte (text None for a non-ASCII byte: no character on its own). Built once."""
        if self._pieces is None:
            pieces = []
            for i in range(self.vocab_size):
                piece = self.id_to_token(i)
                if BYTE_TOKEN.fullmatch(piece):
                    b = int(piece[3:5], 16)
                    pieces.append((chr(b) if b < 0x80 else None, bytes([b])))
                else:
                    text = piece.replace("\u2581", " ")
                    pieces.append((text, text.encode()))
            self._pieces = pieces
        return self._pieces

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Ids of the tokens added on top of the sentencepiece vocabulary (<|user|>, <|end|>, ...)."""
        return frozenset(self._backend.get_added_tokens_decoder())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids, except inside `literal(...)` spans.
        `add_special_tokens` prepends BOS."""
        if not isinstance(text, str):
            raise InputError(f"can only encode a string, got {type(text).__name__}")
        try:
            if _LITERAL_MARKS.search(text):
                return self._encode_with_literals(text, add_special_tokens)
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except (TypeError, UnicodeError) as e:  # e.g. a lone surrogate, which Rust strings cannot hold
            raise InputError(f"this text cannot be tokenized ({type(e).__name__}): send valid UTF-8 text") from e

    def _encode_with_literals(self, text: str, add_special_tokens: bool) -> list[int]:
        """As encode, but added tokens that overlap a literal span stay text. The text between the other added tokens
        is encoded alone by the tokenizer without added tokens, as the backend itself encodes each such segment."""
        plain, spans = _unmark(text)
        enc = self._backend.encode(plain, add_special_tokens=False)
        added = self.added_token_ids
        if self._plain_backend is None:
            raw = json.loads(self._backend.to_str())
            raw["added_tokens"] = []
            self._plain_backend = Backend.from_str(json.dumps(raw))
        ids, pos = [], 0
        for i, (s, e) in zip(enc.ids, enc.offsets):
            if i not in added:
                continue
            at = plain.find(self._backend.id_to_token(i), s, e)  # the token itself, without what lstrip/rstrip ate
            if any(at < b and a < at + len(self._backend.id_to_token(i)) for a, b in spans):
                continue
            if s > pos:
                ids += self._plain_backend.encode(plain[pos:s], add_special_tokens=False).ids
            ids.append(i)
            pos = e
        if pos < len(plain):
            ids += self._plain_backend.encode(plain[pos:], add_special_tokens=False).ids
        if add_special_tokens:  # the post-processor's prefix and suffix, as they wrap one token
            a = self._backend.encode("a", add_special_tokens=False).ids
            full = self._backend.encode("a", add_special_tokens=True).ids
            start = next(k for k in range(len(full)) if full[k:k + len(a)] == a)
            ids = full[:start] + ids + full[start + len(a):]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; skipping drops every added token marked special (`<|end|>`, `<|assistant|>`, not `</s>`)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Render `messages` ([{"role", "content"}, ...]) with the checkpoint's template; text if not `tokenize`."""
        if self._chat_template is None:
            raise CheckpointError(f"{self._where} has no chat template: add `chat_template` to its {CONFIG_FILE}")
        chat = _check_messages(messages)
        try:
            text = self._chat_template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:  # raise_exception(...) or a message the template cannot handle
            raise InputError(f"the chat template rejected these messages: {e}") from e
        except UnicodeError as e:  # a lone surrogate in a message
            raise InputError(f"a message is not valid text ({type(e).__name__}): send valid UTF-8 text") from e
        return self.encode(text) if tokenize else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Text deltas of ids pushed one at a time; all deltas joined equal `decode(all ids)`, flush() included.

    A delta is emitted only up to a "solid" token (neither a byte-fallback token nor a skipped special token): byte
    runs merge across tokens, and a run is all U+FFFD as soon as any byte in it is invalid, so no text of a run is
    final before it ends. Each delta is the difference of decoding a window with and without the new ids, so the
    sentencepiece decoder's strip of the first leading space hits the same character in both and cancels out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._decode = tokenizer._backend.decode
        self._skip = skip_special_tokens
        self._held = tokenizer._byte_ids | (tokenizer._special_ids if skip_special_tokens else frozenset())
        self._window: list[int] = []  # ids since the last-but-one emission: window[:read] is context, already out
        self._read = 0
        self._prefix = ""  # decode(window[:read])

    def push(self, token_id: int) -> str:
        """Text completed by `token_id`; empty while a byte run or skipped special tokens may still change it."""
        self._window.append(token_id)
        return "" if token_id in self._held else self._emit()

    def flush(self) -> str:
        """The text still held back (at the end of a stream: incomplete bytes decode to U+FFFD, as in `decode`)."""
        return self._emit() if len(self._window) > self._read else ""

    def _emit(self) -> str:
        text = self._decode(self._window, skip_special_tokens=self._skip)
        delta = text[len(self._prefix):]
        self._window = self._window[self._read:]  # the new context: the ids this delta came from
        self._read = len(self._window)
        self._prefix = self._decode(self._window, skip_special_tokens=self._skip)
        return delta
