"""Phi-3(.5)-vision: the decoder plus the image embedding, and prompts with `<|image_N|>` tags."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import Phi3Config
from .errors import InputError
from .model import CausalLM
from .tokenizer import Tokenizer
from .vision import ImageEmbeddingConfig, Phi3ImageEmbedding

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
VISION_ARCHITECTURES = ("Phi3VForCausalLM",)
# The tied copy of embed_tokens that some exports store; the reference never stores it.
TIED_WTE = "model.vision_embed_tokens.wte.weight"


def is_vision_config(d: dict) -> bool:
    return any(a in VISION_ARCHITECTURES for a in d.get("architectures") or [])


def recomputes_on_long_switch(model_dir: Path) -> bool:
    """Phi-3.5-vision's reference recomputes the cache when generation crosses original_max_position_embeddings;
    Phi-3-vision's does not (its cached keys keep the short factors). Phi-3.5-vision ships processor_config.json,
    Phi-3-vision does not: that file tells the two reference behaviours apart."""
    return (model_dir / "processor_config.json").is_file()


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


class Phi3VForCausalLM(CausalLM):
    """Phi3VForCausalLM: `model.vision_embed_tokens` turns images into rows spliced at placeholder ids (< 0)."""

    def __init__(self, cfg: Phi3Config, vision: ImageEmbeddingConfig):
        super().__init__(cfg)
        self.model.vision_embed_tokens = Phi3ImageEmbedding(vision)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, features=None) -> torch.Tensor:
        """(B, T) ids with image placeholders -> (B, T, C) embeddings; image k's rows go to its -k run.
        `features` (one (rows, C) tensor per image) skips the vision tower when they are already known."""
        x = self.model.embed_tokens(input_ids.clamp_min(0))
        where = input_ids < 0
        n_slots = int(where.sum())
        if n_slots == 0:
            return x
        if pixel_values is None and features is None:
            raise InputError("the prompt has image placeholders but no images were given")
        if input_ids.shape[0] != 1:
            raise InputError("embed one prompt with images at a time (rows do not share images)")
        feats = features if features is not None else self.model.vision_embed_tokens(pixel_values, image_sizes)
        # rows of all images in the order their placeholder runs appear (image k fills the run of -k)
        order = [-int(v) for v in torch.unique_consecutive(input_ids[where])]
        rows = torch.cat([feats[k - 1] for k in order]) if order else x.new_zeros(0, x.shape[-1])
        if rows.shape[0] != n_slots:
            raise InputError(f"the prompt has {n_slots} image placeholder tokens but the images give {rows.shape[0]} "
                             "feature rows; build prompts with the same num_crops as the images")
        x = x.clone()
        x[where] = rows.to(x.dtype)
        return x

    @staticmethod
    def sanitize(cfg, state):
        state.pop(TIED_WTE, None)
        return CausalLM.sanitize(cfg, state)
