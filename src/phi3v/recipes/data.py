"""The nano recipe's training files, built from a `phi3v synth` split: reading warm-up (captions and transcriptions
as caption records), multi-turn SFT conversations (one image, all its questions) and DPO pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

TRANSCRIBE = "Transcribe the text in the image."
IMAGE_TAG = "<|image_1|>\n"


def _read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pretrain_records(split_dir: Path) -> list[dict]:
    """One caption record per image (the loss is on the text): its transcription, if it has text, then its caption,
    so every pass of the vision tower teaches reading and describing."""
    read = {r["images"][0]: r["messages"][-1]["content"] for r in _read(split_dir / "transcribe.jsonl")}
    return [{"image": r["image"], "text": (read[r["image"]] + "\n\n" if r["image"] in read else "") + r["text"]}
            for r in _read(split_dir / "captions.jsonl")]


def sft_records(split_dir: Path, seed: int, max_turns: int = 8) -> list[dict]:
    """One conversation per image: its questions in a seeded order, the first turn carrying the image tag as the
    evaluation asks it, then the transcription request; one pass of the vision tower teaches every answer."""
    by_image: dict[str, list[dict]] = {}
    for r in _read(split_dir / "qa.jsonl"):
        by_image.setdefault(r["images"][0], []).append(r)
    read = {r["images"][0]: r["messages"][-1]["content"] for r in _read(split_dir / "transcribe.jsonl")}
    rng = random.Random(f"phi3v-nano/sft/{seed}")
    rows = []
    for image, qs in by_image.items():
        qs = list(qs)
        rng.shuffle(qs)
        turns = [(q["question"], q["answer"]) for q in qs[:max_turns]]
        if image in read and all(a != read[image] for _, a in turns):
            turns.append((TRANSCRIBE, read[image]))
        messages = []
        for k, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": (IMAGE_TAG if k == 0 else "") + question})
            messages.append({"role": "assistant", "content": answer})
        if messages:
            rows.append({"images": [image], "messages": messages})
    rng.shuffle(rows)
    return rows


def dpo_records(split_dir: Path) -> list[dict]:
    """The split's preference pairs as `phi3v train dpo` reads them (prompt, chosen, rejected, images)."""
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "images": r["images"]}
            for r in _read(split_dir / "dpo.jsonl")]


def write_training_files(split_dir: Path, seed: int) -> dict[str, Path]:
    """pretrain.jsonl, sft.jsonl and dpo_pairs.jsonl next to the split's own files (image paths stay relative)."""
    split_dir = Path(split_dir)
    return {"pretrain": _write(split_dir / "pretrain.jsonl", pretrain_records(split_dir)),
            "sft": _write(split_dir / "sft.jsonl", sft_records(split_dir, seed)),
            "dpo": _write(split_dir / "dpo_pairs.jsonl", dpo_records(split_dir))}


def rejected_rate(report: dict, split_dir: Path) -> dict:
    """How often the predictions equal the rejected answer of the split's DPO pairs (another size's price, a
    neighbouring bar): {"pairs": n, "rejected": k, "rate": k / n}; the report's items are matched by id."""
    rejected = {r["id"]: r["rejected"] for r in _read(Path(split_dir) / "dpo.jsonl")}
    preds = {row["id"]: row["prediction"] for row in report["items"]}
    ids = [i for i in rejected if i in preds]
    hits = sum(preds[i].strip().rstrip(".").lower() == rejected[i].strip().rstrip(".").lower() for i in ids)
    return {"pairs": len(ids), "rejected": hits, "rate": hits / len(ids) if ids else 0.0}
