"""Loaders: one per layout the benchmarks are published in, from local paths only (nothing is downloaded).

Each `load_*(path, split)` returns a list of `Item`s; images stay as paths or encoded bytes until the model
reads them. Parquet files need pyarrow, imported only when a parquet file is read.
"""

from __future__ import annotations

import ast
import base64
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Item:
    """One question: its images (paths, bytes or PIL images), accepted answers, and what the metric needs."""

    id: str
    question: str
    answers: list[str]
    images: list = field(default_factory=list)
    category: str = ""
    choices: list[str] = field(default_factory=list)  # option texts, lettered A, B, ... in this order
    meta: dict = field(default_factory=dict)  # JSON-serialisable extras a metric reads (kind, index, hint, ...)


# ---------------------------------------------------------------- helpers


def _exists(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} not found: {path}; pass --data pointing at the downloaded files")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path} as JSON ({e}); is it the file from the dataset release?") from e


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSON-lines file (blank lines skipped); a JSON array is accepted too."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return _read_json(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n} is not a JSON object ({e})") from e
    return rows


def read_parquet(path: Path) -> list[dict]:
    """Rows of a parquet file as dicts (image columns come as {"bytes", "path"})."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise InputError(f"cannot read parquet file {path}: {e}") from e


def _parquet_files(path: Path, split: str) -> list[Path]:
    """The parquet file given, or those under a folder whose name starts with the split (all if none does)."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise InputError(f"no .parquet files under {path}")
    picked = [f for f in files if f.name.startswith(split)]
    return picked or files


def _image_value(v):
    """A parquet image cell ({"bytes", "path"}) or raw bytes -> bytes, or None."""
    if isinstance(v, dict):
        v = v.get("bytes")
    return bytes(v) if v else None


def _find(folder: Path, names: list[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"none of {names} in {folder}; point --data at the dataset folder")


# ---------------------------------------------------------------- ChartQA


def load_chartqa(path, split: str = "test") -> list[Item]:
    """ChartQA: `{split}_human.json` / `{split}_augmented.json` + `png/` (in PATH or PATH/split), or a parquet file
    (columns question, answer, image, and type = human_test / augmented_test)."""
    path = _exists(path, "ChartQA data")
    if path.suffix == ".parquet" or (path.is_dir() and not _chartqa_dir(path, split) and any(path.rglob("*.parquet"))):
        items = []
        for f in _parquet_files(path, split):
            for i, row in enumerate(read_parquet(f)):
                kind = "human" if str(row.get("type", "")).startswith("human") else "augmented"
                items.append(Item(f"{f.stem}-{i}", row["question"], [str(row["answer"])],
                                  [_image_value(row.get("image"))], kind))
        return items
    folder = _chartqa_dir(path, split)
    if folder is None:
        raise InputError(f"no {split}_human.json or {split}_augmented.json in {path} or {path / split}")
    items = []
    for kind in ("human", "augmented"):
        f = folder / f"{split}_{kind}.json"
        if f.is_file():
            for i, row in enumerate(_read_json(f)):
                items.append(Item(f"{split}_{kind}-{i}", row["query"], [str(row["label"])],
                                  [folder / "png" / row["imgname"]], kind))
    return items


def _chartqa_dir(path: Path, split: str) -> Path | None:
    for folder in (path, path / split):
        if any((folder / f"{split}_{k}.json").is_file() for k in ("human", "augmented")):
            return folder
    return None


# ---------------------------------------------------------------- DocVQA, TextVQA


def load_docvqa(path, split: str = "val") -> list[Item]:
    """DocVQA: `{split}_v1.0.json` ({"data": [{questionId, question, image: "documents/x.png", answers}]})."""
    path = _exists(path, "DocVQA data")
    f = path if path.is_file() else _find(path, [f"{split}_v1.0.json", f"{split}/{split}_v1.0.json"])
    items = []
    for row in _read_json(f)["data"]:
        image = f.parent / row["image"]
        if not image.is_file() and (f.parent / "documents" / Path(row["image"]).name).is_file():
            image = f.parent / "documents" / Path(row["image"]).name
        types = row.get("question_types") or []
        items.append(Item(str(row["questionId"]), row["question"], list(row.get("answers") or []), [image],
                          types[0] if types else "", meta={"question_types": types}))
    return items


TEXTVQA_IMAGE_DIRS = ("train_images", "test_images", "images", ".")


def load_textvqa(path, split: str = "val") -> list[Item]:
    """TextVQA: `TextVQA_0.5.1_{split}.json` ({"data": [{question_id, question, image_id, answers}]}) with the
    images `{image_id}.jpg` in train_images/ (train and val), test_images/ or images/."""
    path = _exists(path, "TextVQA data")
    f = path if path.is_file() else _find(path, [f"TextVQA_0.5.1_{split}.json"])
    dirs = [f.parent / d for d in TEXTVQA_IMAGE_DIRS]
    items = []
    for row in _read_json(f)["data"]:
        name = f"{row['image_id']}.jpg"
        image = next((d / name for d in dirs if (d / name).is_file()), dirs[0] / name)
        items.append(Item(str(row["question_id"]), row["question"], list(row.get("answers") or []), [image], ""))
    return items


# ---------------------------------------------------------------- ScienceQA, AI2D


def load_scienceqa(path, split: str = "test", with_images_only: bool = True) -> list[Item]:
    """ScienceQA: `problems.json` + `pid_splits.json` + `images/{split}/{pid}/image.png`; by default only the
    questions with an image (ScienceQA-IMG, as lmms-eval scienceqa_img and the published numbers)."""
    path = _exists(path, "ScienceQA data")
    problems = _read_json(_find(path, ["problems.json", "data/problems.json"]))
    splits = _read_json(_find(path, ["pid_splits.json", "data/pid_splits.json"]))
    if split not in splits:
        raise InputError(f"split {split!r} is not in pid_splits.json (it has {', '.join(splits)})")
    items = []
    for pid in splits[split]:
        p = problems[pid]
        images = []
        if p.get("image"):
            image = path / "images" / split / pid / p["image"]
            images = [image if image.is_file() else path / "images" / pid / p["image"]]
        if with_images_only and not images:
            continue
        items.append(Item(pid, p["question"], [LETTERS[int(p["answer"])]], images, p.get("subject", ""),
                          list(p["choices"]), {"hint": p.get("hint") or ""}))
    return items


def load_ai2d(path, split: str = "test") -> list[Item]:
    """AI2D: the parquet (question, options, answer = index, image), or the release folder: `questions/*.json`
    + `images/` (with `ai2d_test_ids.csv` choosing the test images when present)."""
    path = _exists(path, "AI2D data")
    if path.suffix == ".parquet" or (path.is_dir() and not (path / "questions").is_dir()):
        items = []
        for f in _parquet_files(path, split):
            for i, row in enumerate(read_parquet(f)):
                options = [str(o) for o in row["options"]]
                items.append(Item(f"{f.stem}-{i}", row["question"], [LETTERS[int(row["answer"])]],
                                  [_image_value(row.get("image"))], "", options))
        return items
    keep = None
    ids = path / "ai2d_test_ids.csv"
    if ids.is_file():
        test = {line.strip() for line in ids.read_text().splitlines() if line.strip()}
        keep = (lambda stem: stem in test) if split == "test" else (lambda stem: stem not in test)
    items = []
    for f in sorted((path / "questions").glob("*.json"), key=lambda p: _natural(p.name)):
        doc = _read_json(f)
        image_name = doc.get("imageName", f.name[:-5])
        if keep is not None and not keep(Path(image_name).stem):
            continue
        for q, d in doc["questions"].items():
            items.append(Item(d.get("questionId", f"{image_name}-{len(items)}"), q, [LETTERS[int(d["correctAnswer"])]],
                              [path / "images" / image_name], "", [str(a) for a in d["answerTexts"]],
                              {"abc_label": bool(d.get("abcLabel"))}))
    return items


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- MMMU, MMBench


_MMMU_IMAGE = re.compile(r"<image (\d+)>")


def load_mmmu(path, split: str = "validation") -> list[Item]:
    """MMMU parquet (`{Subject}/{split}-*.parquet`: id, question, options, answer, question_type, image_1..7);
    the images are those the question or options name as <image N> (as lmms-eval mmmu_doc_to_visual)."""
    path = _exists(path, "MMMU data")
    items = []
    for f in _parquet_files(path, split):
        for row in read_parquet(f):
            options = row.get("options") or "[]"
            options = ast.literal_eval(options) if isinstance(options, str) else list(options)  # a str in MMMU
            text = row["question"] + " " + " ".join(map(str, options))
            numbers = sorted({int(n) for n in _MMMU_IMAGE.findall(text)})
            images = [_image_value(row.get(f"image_{n}")) for n in numbers]
            qtype = row.get("question_type") or ("multiple-choice" if options else "open")
            items.append(Item(row["id"], row["question"], mmmu_answers(row.get("answer")), [i for i in images if i],
                              mmmu_subject(row["id"]), [str(o) for o in options], {"question_type": qtype}))
    return items


def mmmu_answers(answer) -> list[str]:
    """A few open MMMU answers are lists, stored in the parquet as their repr ("['24', '24.0']"): MMMU's own
    answer_dict keeps them as lists, and eval_open accepts any of them."""
    if isinstance(answer, str) and answer.startswith("["):
        try:
            parsed = ast.literal_eval(answer)
            if isinstance(parsed, list):
                return [str(a) for a in parsed]
        except (ValueError, SyntaxError):
            pass
    return [str(answer if answer is not None else "")]


def mmmu_subject(item_id: str) -> str:
    """validation_Art_Theory_12 -> Art_Theory."""
    parts = item_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) > 2 else item_id


def load_mmbench(path, split: str = "dev") -> list[Item]:
    """MMBench TSV (index, question, hint, A.., answer, category, image as base64); rotated copies of a
    question (index + k * 1e6) are kept for circular evaluation."""
    path = _exists(path, "MMBench TSV")
    f = path if path.is_file() else _find(path, [f"MMBench_{split.upper()}_EN.tsv", f"mmbench_{split}.tsv"])
    csv.field_size_limit(sys.maxsize)
    with f.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    # VLMEvalKit ImageBaseDataset: an image cell of <= 64 characters is the index of the row holding the image
    images = {r["index"]: r.get("image", "") for r in rows}
    items = []
    for r in rows:
        image = images[r["index"]]
        if len(image) <= 64:
            image = images.get(image, "")
        if not image:
            raise InputError(f"{f}: row {r['index']} has no image (base64) and names no row that has one")
        choices = []
        for letter in LETTERS:
            if not _present(r.get(letter)):
                break
            choices.append(r[letter])
        hint = r.get("hint") if _present(r.get("hint")) else ""
        answers = [r["answer"]] if _present(r.get("answer")) else []
        items.append(Item(r["index"], r["question"], answers, [base64.b64decode(image)], r.get("category", ""),
                          choices, {"index": int(r["index"]), "hint": hint, "l2_category": r.get("l2-category", "")}))
    return items


def _present(v) -> bool:
    return v is not None and v != "" and v.lower() != "nan"  # pandas writes missing cells as "" or "nan"


# ---------------------------------------------------------------- POPE, the synthetic set


POPE_IMAGE_DIRS = (".", "images", "val2014")


def load_pope(path, split: str = "") -> list[Item]:
    """POPE jsonl (`coco_pope_{adversarial,popular,random}.json`: question_id, image, text, label), a file or a
    folder of them; category = the variant named in the file name (or the row's "category")."""
    path = _exists(path, "POPE data")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    files = [f for f in files if "pope" in f.stem.lower()] or files  # the release names them coco_pope_*
    if split:
        files = [f for f in files if split in f.stem] or files
    if not files:
        raise InputError(f"no POPE .json/.jsonl files in {path}")
    items = []
    for f in files:
        variant = next((v for v in ("adversarial", "popular", "random") if v in f.stem), f.stem)
        for row in read_jsonl(f):
            if "image" not in row or "question_id" not in row:
                raise InputError(f"{f}: a row without \"image\" or \"question_id\"; is this a POPE file?")
            name = row["image"]
            image = next((f.parent / d / name for d in POPE_IMAGE_DIRS if (f.parent / d / name).is_file()),
                         f.parent / name)
            question = row.get("text", row.get("question", ""))
            answer = str(row.get("label", row.get("answer", ""))).strip().lower()
            if answer not in ("yes", "no"):
                raise InputError(f"{f}: question {row.get('question_id')} has label {answer!r}; POPE labels are yes/no")
            items.append(Item(f"{variant}-{row['question_id']}", question, [answer], [image],
                              row.get("category", variant)))
    return items


def load_synth(path, split: str = "test") -> list[Item]:
    """The `phi3v synth` set: DIR/{split}/qa.jsonl (or the jsonl, or its folder); images relative to the jsonl."""
    path = _exists(path, "synthetic data")
    if path.is_dir():
        path = path / "qa.jsonl" if (path / "qa.jsonl").is_file() else path / split / "qa.jsonl"
    if not path.is_file():
        raise InputError(f"no qa.jsonl at {path}; run `phi3v synth --out DIR` and pass DIR, DIR/{split} or the jsonl")
    items = []
    for row in read_jsonl(path):
        answers = list(row.get("answers") or [row["answer"]])
        items.append(Item(row["id"], row["question"], [str(a) for a in answers],
                          [path.parent / p for p in row.get("images") or []], row.get("family", ""),
                          meta={"kind": row.get("kind", "")}))
    return items
