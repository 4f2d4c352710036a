"""Synthetic "textbook" document images with questions, captions, transcriptions and DPO pairs (`phi3v synth`).

Layout of OUT: manifest.json and, per split, images/{family}-{k:05d}.png|jpg, qa.jsonl, captions.jsonl,
transcribe.jsonl, dpo.jsonl (see writer.py). test-novel draws fonts, palettes and label words that the other splits
never use. A seed reproduces every byte: each image has its own random.Random seeded from (seed, split, family, k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

from . import charts, menu, shapes, tables, text
from .render import (NoFit, SynthConfig, augment, check_fonts, draw_style, encode, is_novel,
                                     split_fonts, split_palettes)
from .writer import Sample, SplitWriter
from ...errors import InputError

FAMILIES = ("menu", "chart", "table", "text", "shapes")
SPLITS = ("train", "val", "test", "test-novel")
MODULES = {"menu": menu, "chart": charts, "table": tables, "text": text, "shapes": shapes}
VERSION = 1
MAX_TRIES = 50  # redraws of the facts when content does not fit, and of the image when its bytes repeat

__all__ = ["FAMILIES", "SPLITS", "SynthConfig", "generate", "make_sample", "split_size"]


def split_size(split: str, n: int, n_families: int, split_sizes: dict | None = None) -> int:
    """Images in a split: n for train, else max(n // 10, one per family), unless split_sizes names the split."""
    if split_sizes and split in split_sizes:
        return split_sizes[split]
    return n if split == "train" else max(n // 10, n_families)


def make_sample(split: str, family: str, k: int, seed: int, cfg: SynthConfig, seen: set[str] | None = None) -> Sample:
    """Draw image k of a family in a split; redraws while its bytes' hash is already in seen (and adds it)."""
    mod, seen = MODULES[family], seen if seen is not None else set()
    vocab = "novel" if is_novel(split) else "train"
    fitted = False
    for attempt in range(MAX_TRIES):
        rng = random.Random(f"phi3v-synth/{seed}/{split}/{family}/{k}/{attempt}")
        style = draw_style(rng, split, cfg)
        for _ in range(MAX_TRIES):
            f = mod.facts(rng, vocab, cfg)
            try:
                img = mod.draw(f, style, rng, cfg)
                break
            except NoFit:
                continue
        else:  # nothing fits in this style (a wide font at a large cap height): the next attempt draws another
            continue
        fitted = True
        data, ext = encode(augment(img, rng, cfg), rng, cfg)
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        facts = dict(f, style={"font": style.font if mod.HAS_TEXT else None, "palette": style.palette.name})
        return Sample(family, k, data, ext, facts, mod.questions(f, rng), mod.caption(f),
                      "\n".join(mod.lines(f)) if mod.HAS_TEXT else None)
    if not fitted:
        raise InputError(f"{family} content never fits in max_side={cfg.max_side} px: raise max_side or lower "
                         f"max_items / min_cap_px in SynthConfig")
    raise RuntimeError(f"{family} image {k} of {split} repeated an earlier image {MAX_TRIES} times")


def generate(out_dir, n: int, seed: int = 0, families=FAMILIES, splits=SPLITS,
             progress: Callable[[int], None] | None = None, split_sizes: dict | None = None,
             config: SynthConfig | None = None) -> dict:
    """Write the synthetic set to out_dir; progress(1) is called after each image. Returns counts per split/family."""
    families, splits = _check(n, families, splits, split_sizes)
    cfg = config or SynthConfig()
    out = Path(out_dir)
    for split in splits:
        if (out / split).exists() and any((out / split).iterdir()):
            raise InputError(f"{out / split} already holds files: choose an empty --out folder or delete it first")
    check_fonts(sorted({name for s in splits for name in split_fonts(s)}))
    seen: set[str] = set()  # image hashes over all splits: no two images anywhere are byte-identical
    manifest = {"seed": seed, "n": n, "families": list(families), "config": dataclasses.asdict(cfg), "splits": {},
                "version": VERSION}
    summary = {"out": str(out), "images": {}, "qa": {}}
    for split in splits:
        writer = SplitWriter(out / split, split)
        try:
            for i in range(split_size(split, n, len(families), split_sizes)):
                family = families[i % len(families)]  # round-robin: family counts differ by at most one
                writer.add(make_sample(split, family, i // len(families), seed, cfg, seen))
                if progress is not None:
                    progress(1)
        finally:
            writer.close()
        fonts = split_fonts(split) if any(MODULES[f].HAS_TEXT for f in families) else ()
        manifest["splits"][split] = {"images": sum(writer.images.values()), "qa": writer.qa,
                                     "fonts": list(fonts), "palettes": list(split_palettes(split)),
                                     "families": writer.images}
        summary["images"][split], summary["qa"][split] = dict(writer.images), writer.qa
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return summary


def _check(n, families, splits, split_sizes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"n must be a positive number of images per split, got {n!r}")
    families, splits = (tuple(v.split(",")) if isinstance(v, str) else tuple(v) for v in (families, splits))
    for name, given, known in (("family", families, FAMILIES), ("split", splits, SPLITS)):
        if not given:
            raise InputError(f"no {name} given: choose from {', '.join(known)}")
        bad = [g for g in given if g not in known]
        if bad:
            raise InputError(f"unknown {name} {', '.join(map(repr, bad))}: choose from {', '.join(known)}")
        if len(set(given)) != len(given):
            raise InputError(f"a {name} is listed twice in {', '.join(given)}")
    for split, size in (split_sizes or {}).items():
        if split not in SPLITS:
            raise InputError(f"split_sizes names unknown split {split!r}: choose from {', '.join(SPLITS)}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InputError(f"split_sizes[{split!r}] must be a positive number of images, got {size!r}")
    return families, splits

