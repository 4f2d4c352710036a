"""What a request is checked for before any work: its JSON, and its images' token cost read from their headers."""

from __future__ import annotations

import json
from pathlib import Path

from ..inference.requests import check_prompt_fits
from ..processing.prompts import tokenize_with_images, with_image_tags
from .protocol import APIError, read_image_header


def loads(raw: bytes):
    """A request body's JSON; 400 for anything else: bad UTF-8, lone surrogates, NaN/Infinity, nesting too deep
    for the parser, integers too long for Python to parse."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode()  # lone surrogates (\ud800) cannot be encoded or tokenized
    except (ValueError, UnicodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_image_cost(model, messages: list[dict], allow_dirs: tuple[Path, ...], max_pixels: int,
                     max_context: int) -> None:
    """Replace each image URL with its bytes and header size, and refuse the request (400) if its prompt, counted
    with each image's tokens from its size, does not fit the context. No pixel is decoded."""
    n = 0
    for m in messages:
        if "images" in m:
            m["images"] = [read_image_header(u, allow_dirs, max_pixels, n + i + 1)
                           for i, u in enumerate(m["images"])]
            n += len(m["images"])
    counts, plain = [], []
    for m in messages:  # as Phi3Model.prepare numbers and places them
        images = m.get("images", [])
        text = with_image_tags(m["content"], len(counts) + 1, len(images))
        counts += [model.processor.num_tokens_for_size(im.width, im.height) for im in images]
        plain.append({"role": m["role"], "content": text})
    text = model.tokenizer.apply_chat_template(plain, tokenize=False)
    check_prompt_fits(len(tokenize_with_images(model.tokenizer, text, counts)), model.config, max_context)
