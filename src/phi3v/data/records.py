"""JSONL readers for conversations, image-caption pairs and preference triples; bad records are reported, not lost.

Each record remembers where it came from (`file:line`). A bad record (not JSON, missing or mistyped keys, a missing
image, image tags that do not match the images, and later a corrupt image or one too long for `max_length`) goes to
`BadRecords`: with `on_bad_record="error"` it raises InputError naming file and line, with "skip" it is kept in the
report (the CLI prints every one and a summary count). Image paths are relative to the JSONL file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phi3v.errors import InputError
from phi3v.processing.prompts import IMAGE_TAG, image_tags

ON_BAD_RECORD = ("skip", "error")
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """`{"messages": [{"role", "content"}], "images": [paths]}`; content tags images as <|image_N|>."""

    messages: list[dict]
    images: list[Path]
    where: str


@dataclass
class Caption:
    """`{"image": path, "text": caption}` for pretraining: the loss is on the caption."""

    image: Path
    text: str
    where: str


@dataclass
class Preference:
    """`{"prompt" or "messages", "chosen", "rejected", "images"}`: prompt turns and two answers to compare."""

    messages: list[dict]
    chosen: str
    rejected: str
    images: list[Path]
    where: str


@dataclass
class BadRecords:
    """The bad records met so far, as (where, reason); `error` policy raises at the first."""

    policy: str = "skip"
    items: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ON_BAD_RECORD:
            raise InputError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.policy!r}")

    def add(self, where: str, reason: str) -> None:
        if self.policy == "error":
            raise InputError(f"{where}: {reason} (fix the record, or pass on_bad_record='skip' to skip bad records)")
        self.items.append((where, reason))

    def summary(self, total: int) -> str:
        return f"{len(self.items)} of {total} records skipped as bad" if self.items else f"{total} records, none bad"


def read_jsonl(path: str | Path, parse: Callable[[dict, Path, str], object], bad: BadRecords) -> tuple[list, int]:
    """Records of a JSONL file parsed by `parse(obj, folder, where)` (which raises InputError for a bad one),
    and the number of non-blank lines read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    records, total = [], 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise InputError(f"a record is a JSON object, got {type(obj).__name__}")
                records.append(parse(obj, path.parent, where))
            except json.JSONDecodeError as e:
                bad.add(where, f"not valid JSON ({e.msg} at column {e.colno})")
            except InputError as e:
                bad.add(where, str(e))
    return records, total


def _image_path(value, folder: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"an image is a file path string, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    return path


def _images(obj: dict, folder: Path) -> list[Path]:
    images = obj.get("images") or []
    if not isinstance(images, list):
        raise InputError(f'"images" is a list of paths, got {images!r}')
    return [_image_path(v, folder) for v in images]


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError('"messages" is a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"message {i} needs a role in {ROLES} and a string content, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _tag_images(messages: list[dict], n_images: int) -> list[dict]:
    """Check the <|image_N|> tags against the images; with no tags at all, tag them in front of the first user turn."""
    text = "".join(m["content"] for m in messages)
    if n_images and not IMAGE_TAG.search(text):
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise InputError("images need a user message to attach to")
        first["content"] = "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1)) + first["content"]
        return messages
    image_tags(text, n_images)
    for m in messages:
        if m["role"] == "assistant" and IMAGE_TAG.search(m["content"]):
            raise InputError("an assistant turn holds an image tag: images go in system or user turns")
    return messages


def parse_conversation(obj: dict, folder: Path, where: str) -> Conversation:
    images = _images(obj, folder)
    messages = _tag_images(_messages(obj.get("messages")), len(images))
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError("the conversation has no assistant turn to learn from")
    return Conversation(messages, images, where)


def parse_caption(obj: dict, folder: Path, where: str) -> Caption:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InputError('a caption record needs a non-empty string "text"')
    return Caption(_image_path(obj.get("image"), folder), text, where)


def _answer(value, key: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):  # [{"role": "assistant", ...}]
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    if not isinstance(value, str):
        raise InputError(f'"{key}" is a string (or one assistant message), got {value!r}')
    return value


def parse_preference(obj: dict, folder: Path, where: str) -> Preference:
    if ("prompt" in obj) == ("messages" in obj):
        raise InputError('a preference record has exactly one of "prompt" or "messages"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise InputError(f'"prompt" is a string, got {obj["prompt"]!r}')
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = _messages(obj["messages"])
    if messages[-1]["role"] == "assistant":
        raise InputError("the prompt ends with an assistant turn: the chosen and rejected answers come after it")
    images = _images(obj, folder)
    return Preference(_tag_images(messages, len(images)), _answer(obj.get("chosen"), "chosen"),
                      _answer(obj.get("rejected"), "rejected"), images, where)


PARSERS = {"conversation": parse_conversation, "caption": parse_caption, "preference": parse_preference}


def read_records(path: str | Path, kind: str, bad: BadRecords) -> tuple[list, int]:
    """Records of one kind ("conversation", "caption" or "preference") from a JSONL file, and the lines read."""
    if kind not in PARSERS:
        raise InputError(f"unknown record kind {kind!r}; one of {sorted(PARSERS)}")
    return read_jsonl(path, PARSERS[kind], bad)
