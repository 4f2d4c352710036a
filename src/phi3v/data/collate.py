"""Records -> samples (ids, loss mask, images) -> padded batches for Phi-3 and Phi-3-V.

Notation: B samples, T padded length, N images in the batch, K+1 crops per image (global view + up to K crops),
P image placeholder positions in the batch. Labels follow the Hugging Face convention: aligned with input_ids,
shifted inside the loss, -100 wherever no loss is taken (prompt, padding, every image placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from phi3v.errors import InputError
from phi3v.processing.image import ImageProcessor, load_image
from phi3v.processing.prompts import tokenize_with_images
from phi3v.processing.render import render
from phi3v.processing.tokenizer import Tokenizer

from .records import BadRecords, Caption, Conversation

IGNORE = -100  # label of positions without loss (torch's cross_entropy ignore_index)
MAX_NUM_CROPS = 16


@dataclass
class Sample:
    ids: list[int]  # image k of the sample is a run of placeholder ids -k
    mask: list[int]  # 1 where the token is a training target
    images: list[Path]
    where: str


@dataclass
class Encoder:
    """Turns records into samples for one checkpoint: its tokenizer, and for Phi-3-V its processor and num_crops."""

    tokenizer: Tokenizer
    processor: ImageProcessor | None = None
    num_crops: int | None = None
    max_length: int = 2048

    def __post_init__(self):
        if self.num_crops is not None and not 1 <= self.num_crops <= MAX_NUM_CROPS:
            raise InputError(f"num_crops must be 1 to {MAX_NUM_CROPS}, got {self.num_crops}")
        if self.processor is not None and self.num_crops is None:
            self.num_crops = self.processor.num_crops

    @property
    def vision(self) -> bool:
        return self.processor is not None

    def image_tokens(self, images: list[Path]) -> list[int]:
        """Placeholder count of each image; decodes each one fully, so a corrupt file is found here."""
        if images and not self.vision:
            raise InputError("the record has images but the model is a text model")
        sizes = [load_image(p).size for p in images]
        return [self.processor.num_tokens_for_size(w, h, self.num_crops) for w, h in sizes]

    def encode(self, record: Conversation | Caption) -> Sample:
        if isinstance(record, Caption):
            counts = self.image_tokens([record.image])
            ids = tokenize_with_images(self.tokenizer, f"<|image_1|>\n{record.text}", counts)
            ids.append(self.tokenizer.eos_token_id)
            bos = self.tokenizer.bos_token_id
            mask = [int(t >= 0 and t != bos) for t in ids]  # the caption text and its end-of-text
            images = [record.image]
        else:
            counts = self.image_tokens(record.images)
            ids, mask = render(self.tokenizer, record.messages, counts, vision=self.vision)
            images = record.images
        if len(ids) > self.max_length:
            raise InputError(f"{len(ids)} tokens is longer than max_length {self.max_length} (records are never cut, "
                             "so an image block stays whole): shorten it or raise --max-length")
        if not any(mask):
            raise InputError("the record has no token to learn from")
        return Sample(ids, mask, images, record.where)

    def encode_all(self, records: list, bad: BadRecords) -> list[Sample]:
        """Samples of the good records; the others go to `bad` with their file:line."""
        out = []
        for r in records:
            try:
                out.append(self.encode(r))
            except InputError as e:
                bad.add(r.where, str(e))
        return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, placeholders negative, padding = pad id
    labels: torch.Tensor  # (B, T) long, IGNORE where no loss
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens (right padding)
    pixel_values: torch.Tensor | None = None  # (N, K+1, 3, S, S), zero padding crops (never run through CLIP)
    image_sizes: torch.Tensor | None = None  # (N, 2) padded HD (height, width)
    image_rows: torch.Tensor | None = None  # (P,) row of the concatenated image features for each placeholder

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    @property
    def num_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Batch(**move)


def collate(samples: list[Sample], pad_id: int, processor: ImageProcessor | None = None,
            num_crops: int | None = None) -> Batch:
    """Right-padded batch of samples; text-only and image samples mix. Images are processed here, in the order
    samples hold them, and `image_rows` maps each placeholder position (row-major) to its feature row."""
    B, T = len(samples), max(len(s.ids) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        row = torch.tensor(s.ids, dtype=torch.long)
        n = len(s.ids)
        ids[b, :n], attn[b, :n] = row, True
        keep = torch.tensor(s.mask, dtype=torch.bool) & (row >= 0)  # a placeholder is never a label
        labels[b, :n] = torch.where(keep, row, IGNORE)
    images = [p for s in samples for p in s.images]
    if not images:
        return Batch(ids, labels, attn)
    if processor is None:
        raise InputError("the batch has images but no image processor was given")
    processed = processor(images, num_crops=num_crops)
    starts, total = [], 0  # first feature row of each image in the concatenated features
    for n in processed["num_img_tokens"]:
        starts.append(total)
        total += n
    rows, first = [], 0  # first: index of the sample's image 1 among the batch's images
    for s in samples:
        seen: dict[int, int] = {}
        for t in s.ids:
            if t < 0:
                k = -t
                rows.append(starts[first + k - 1] + seen.get(k, 0))
                seen[k] = seen.get(k, 0) + 1
        for k, n in seen.items():
            if n != processed["num_img_tokens"][first + k - 1]:
                raise InputError(f"{s.where}: image {k} has {n} placeholders but {processed['num_img_tokens'][first + k - 1]} "
                                 "feature rows; encode and collate with the same num_crops")
        first += len(s.images)
    return Batch(ids, labels, attn, processed["pixel_values"], processed["image_sizes"],
                 torch.tensor(rows, dtype=torch.long))
