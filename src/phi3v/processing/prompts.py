"""Prompts with `<|image_N|>` tags: checking the tags, adding them, and the reference processor's tokenization
(each text chunk with its own BOS; image k becomes a run of placeholder ids -k)."""

from __future__ import annotations

import re

from ..errors import InputError
from .tokenizer import Tokenizer

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def image_tags(text: str, n_images: int) -> list[int]:
    """The image numbers tagged in text, checked: 1..n_images, each exactly once (any order)."""
    found = [int(m) for m in IMAGE_TAG.findall(text)]
    dup = sorted({k for k in found if found.count(k) > 1})
    if dup:
        raise InputError(f"image tag <|image_{dup[0]}|> appears more than once; tag each image once")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise InputError(f"image tags {sorted(found)} skip a number: tag images <|image_1|> .. <|image_{len(found)}|>")
    if len(found) != n_images:
        raise InputError(f"the prompt tags {len(found)} image(s) but {n_images} image(s) were given")
    return found


def with_image_tags(text: str, first: int, count: int) -> str:
    """Prepend tags <|image_first|> .. for `count` images to text that has none (the reference's layout)."""
    if count == 0 or IMAGE_TAG.search(text):
        return text
    return "".join(f"<|image_{first + i}|>\n" for i in range(count)) + text


def tokenize_with_images(tokenizer: Tokenizer, text: str, num_tokens: list[int]) -> list[int]:
    """As the reference processor: each text chunk between tags is tokenized with its own BOS, and tag k
    becomes num_tokens[k-1] placeholder ids of value -k."""
    order = image_tags(text, len(num_tokens))
    chunks = IMAGE_TAG.split(text)[::2]  # split() also returns the captured numbers; keep the text
    ids = tokenizer.encode(chunks[0], add_special_tokens=True)
    for k, chunk in zip(order, chunks[1:]):
        ids += [-k] * num_tokens[k - 1]
        ids += tokenizer.encode(chunk, add_special_tokens=True)
    return ids
