"""Writes one split folder: images/, qa.jsonl, captions.jsonl, transcribe.jsonl, dpo.jsonl (formats in __init__)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .render import QA

IMAGE_TAG = "<|image_1|>\n"
TRANSCRIBE_PROMPT = "Transcribe the text in the image."
FILES = ("qa.jsonl", "captions.jsonl", "transcribe.jsonl", "dpo.jsonl")


@dataclass
class Sample:
    """One rendered image and everything said about it."""

    family: str
    k: int
    data: bytes  # the encoded image file
    ext: str  # "png" | "jpg"
    facts: dict
    qas: list[QA]
    caption: str
    transcript: str | None  # None where the image has no text (shapes)

    @property
    def image(self) -> str:
        return f"images/{self.family}-{self.k:05d}.{self.ext}"


class SplitWriter:
    """Streams samples of one split to disk; counts images and questions per family."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        self.files = {name: open(folder / name, "w", encoding="utf-8", newline="\n") for name in FILES}
        self.images: dict[str, int] = {}
        self.qa = 0

    def add(self, s: Sample) -> None:
        (self.folder / s.image).write_bytes(s.data)
        stem = f"{self.split}-{s.family}-{s.k:05d}"
        for j, qa in enumerate(s.qas):
            qid = f"{stem}-q{j}"
            self._write("qa.jsonl", {
                "id": qid, "family": s.family, "kind": qa.kind, "question": qa.question, "answer": qa.answer,
                "answers": list(qa.answers), "images": [s.image],
                "messages": [{"role": "user", "content": IMAGE_TAG + qa.question},
                             {"role": "assistant", "content": qa.answer}],
                "facts": s.facts})
            self._write("dpo.jsonl", {"id": qid, "family": s.family, "kind": qa.kind,
                                      "prompt": IMAGE_TAG + qa.question, "chosen": qa.answer,
                                      "rejected": qa.rejected, "images": [s.image]})
        self._write("captions.jsonl", {"image": s.image, "text": s.caption})
        if s.transcript is not None:
            self._write("transcribe.jsonl", {
                "id": f"{stem}-t", "family": s.family, "images": [s.image],
                "messages": [{"role": "user", "content": IMAGE_TAG + TRANSCRIBE_PROMPT},
                             {"role": "assistant", "content": s.transcript}]})
        self.images[s.family] = self.images.get(s.family, 0) + 1
        self.qa += len(s.qas)

    def _write(self, name: str, record: dict) -> None:
        self.files[name].write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()
