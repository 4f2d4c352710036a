"""phi3v synth: determinism, disjoint splits, novel split vocabularies, answers re-derived from facts, images."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v.data.synth import FAMILIES, SPLITS, SynthConfig, charts, generate, menu, render, shapes, tables, text
from phi3v.errors import InputError

SIZES = {s: 5 for s in SPLITS}  # one image per family per split


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "a"
    generate(d, 5, seed=0, split_sizes=SIZES)
    return d


def records(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def image_hashes(folder: Path) -> dict[str, str]:
    return {f"{split}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for split in SPLITS for p in sorted((folder / split / "images").iterdir())}


# --- determinism and splits ------------------------------------------------------------------------------------
def test_same_seed_reproduces_every_byte_and_another_seed_differs(out, tmp_path):
    generate(tmp_path / "b", 5, seed=0, split_sizes=SIZES)
    a, b = files(out), files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 1 + 4 * 4 + 20  # manifest, 4 splits x 4 jsonl, 20 images
    assert [k for k in a if a[k] != b[k]] == []
    generate(tmp_path / "c", 5, seed=1, splits=["train"])
    other = {p.read_bytes() for p in (tmp_path / "c" / "train" / "images").iterdir()}
    assert other.isdisjoint(p.read_bytes() for p in (out / "train" / "images").iterdir())


def test_splits_share_no_image_and_every_family_appears(out):
    hashes = image_hashes(out)
    assert len(hashes) == 20 and len(set(hashes.values())) == 20
    for split in SPLITS:
        qa = records(out / split, "qa.jsonl")
        assert sorted({r["family"] for r in qa}) == sorted(FAMILIES)
        assert {r["images"][0] for r in qa} == {f"images/{p.name}" for p in (out / split / "images").iterdir()}


def test_output_layout(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["n"], manifest["version"]) == (0, 5, 1)
    assert manifest["families"] == list(FAMILIES) and manifest["config"]["min_cap_px"] == 14
    for split in SPLITS:
        m, folder = manifest["splits"][split], out / split
        qa = records(folder, "qa.jsonl")
        assert (m["images"], m["qa"]) == (5, len(qa))
        for r in qa:
            assert r["id"].startswith(f"{split}-{r['family']}-00000-q") and r["answer"] == r["answers"][0]
            assert r["messages"] == [{"role": "user", "content": "<|image_1|>\n" + r["question"]},
                                     {"role": "assistant", "content": r["answer"]}]
            assert (folder / r["images"][0]).is_file()
        assert len({r["id"] for r in qa}) == len(qa)
        captions = [c["image"] for c in records(folder, "captions.jsonl")]
        assert sorted(captions) == sorted({r["images"][0] for r in qa}) and len(captions) == 5
        tr = records(folder, "transcribe.jsonl")
        assert sorted(t["family"] for t in tr) == sorted(f for f in FAMILIES if f != "shapes")
        assert all(t["messages"][0]["content"] == "<|image_1|>\nTranscribe the text in the image." for t in tr)
        dpo = records(folder, "dpo.jsonl")
        assert [(d["id"], d["chosen"], d["prompt"]) for d in dpo] == [
            (r["id"], r["answer"], "<|image_1|>\n" + r["question"]) for r in qa]
        for p in (folder / "images").iterdir():
            w, h = Image.open(p).size
            assert 320 <= max(w, h) <= 640, (p, w, h)


# --- test-novel: no training font, palette or label word -------------------------------------------------------
def label_words(family: str, f: dict) -> set[str]:
    """The printed label words of an image, read from its facts independently of the generator."""
    if family == "menu":
        return {f["title"], *(i["name"] for i in f["items"]), *(t["name"] for t in f["teas"]),
                *(a["label"] for a in f["addons"])}
    if family == "chart":
        return set(f["labels"]) | {f["measure"]}
    if family == "table":
        return {row[0] for row in f["rows"]}
    if family == "text":
        return {w.lower() for line in f["lines"] for w in line.split() if w.isalpha()}
    return set()


def test_novel_split_uses_no_training_font_palette_or_label_word(out):
    manifest = json.loads((out / "manifest.json").read_text())["splits"]
    novel = manifest["test-novel"]
    for split in ("train", "val", "test"):
        assert set(manifest[split]["fonts"]).isdisjoint(novel["fonts"])
        assert set(manifest[split]["palettes"]).isdisjoint(novel["palettes"])
    seen = {s: {"fonts": set(), "palettes": set(), "words": set(), "rgb": set()} for s in SPLITS}
    for split in SPLITS:
        for r in records(out / split, "qa.jsonl"):
            f, s = r["facts"], seen[split]
            if f["style"]["font"] is not None:
                s["fonts"].add(f["style"]["font"])
            s["palettes"].add(f["style"]["palette"])
            s["words"] |= label_words(r["family"], f)
            s["rgb"] |= {tuple(x["rgb"]) for x in f.get("shapes", [])}
        assert seen[split]["fonts"] <= set(manifest[split]["fonts"])
        assert seen[split]["palettes"] <= set(manifest[split]["palettes"])
    for split in ("train", "val", "test"):
        for key in seen[split]:
            assert seen[split][key].isdisjoint(seen["test-novel"][key]), (split, key)
    # and the vocabularies themselves are partitioned, not just this sample of them
    for mod_vocab in (menu.VOCAB, tables.VOCAB):
        for key in mod_vocab["train"]:
            assert set(map(str, mod_vocab["train"][key])).isdisjoint(map(str, mod_vocab["novel"][key]))
    chart_words = [{w for _, words, _ in charts.VOCAB[h]["categories"] for w in words} for h in ("train", "novel")]
    assert chart_words[0].isdisjoint(chart_words[1])
    assert set(text.VOCAB["train"]).isdisjoint(text.VOCAB["novel"])
    assert {c for v in shapes.SHADES["train"].values() for c in v}.isdisjoint(
        c for v in shapes.SHADES["novel"].values() for c in v)
    assert set(render.TRAIN_FONTS).isdisjoint(render.NOVEL_FONTS)
    assert set(render.TRAIN_PALETTES).isdisjoint(render.NOVEL_PALETTES)


# --- every answer re-derived from the facts by small independent functions --------------------------------------
def cents(price: str) -> int:
    return round(float(price.lstrip("$")) * 100)


def dollars(c: int) -> str:
    return "$%d.%02d" % divmod(c, 100)


def menu_price(f: dict, phrase: str) -> str:
    """'a large cappuccino' / 'an 8 oz latte' / 'a pot of Earl Grey' -> its printed price."""
    phrase = re.sub(r"^an? ", "", phrase)
    if phrase.startswith("pot of "):
        return next(t["price"] for t in f["teas"] if t["name"] == phrase[7:])
    for k, size in enumerate(f["sizes"]):
        for item in f["items"]:
            if phrase == f"{size} {item['name'].lower()}":
                return item["prices"][k]
    raise AssertionError(phrase)


def derive(r: dict) -> str:
    f, q, kind = r["facts"], r["question"], r["kind"]
    if r["family"] == "menu":
        if kind == "price":
            return menu_price(f, re.fullmatch(r"How much is (.+)\?", q).group(1))
        if kind == "addon":
            return next(a["price"] for a in f["addons"] if q == f"How much is {a['phrase']}?")
        a, b = re.fullmatch(r"How much are (.+) and (.+) together\?", q).groups()
        return dollars(cents(menu_price(f, a)) + cents(menu_price(f, b)))
    if r["family"] == "chart":
        unit = "%" if f["chart"] == "pie" else ""
        vals = dict(zip(f["labels"], f["values"]))
        if kind == "value":
            label = re.search(r"(?:for|of|did) (\w+)", q).group(1)
            return f"{vals[label]}{unit}"
        if kind in ("argmax", "argmin"):
            return (max if kind == "argmax" else min)(vals, key=vals.get)
        a, b = re.fullmatch(r"What is the difference between the \w+ of (\w+) and (\w+)\?", q).groups()
        return str(abs(vals[a] - vals[b]))
    if r["family"] == "table":
        header, rows = f["header"], f["rows"]
        if kind == "markdown":
            out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])
        if kind == "json":
            return json.dumps([{h: c for h, c in zip(header, row)} for row in rows], ensure_ascii=False)
        noun, key = re.fullmatch(r"What is the (.+) of (\w+)\?", q).groups()
        return next(row for row in rows if row[0] == key)[1 + f["nouns"].index(noun)]
    if r["family"] == "text":
        if kind == "transcribe":
            return "\n".join(f["lines"])
        return f["lines"][int(re.search(r"line (\d+)", q).group(1)) - 1]
    cells = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    items = f["shapes"]
    if kind == "count":
        return str(sum(s["kind"] + "s" == q.split()[2] for s in items))
    if kind == "colour":
        return next(s["colour"] for s in items if q == f"What colour is the {s['kind']}?")
    return next(cells[s["cell"]] for s in items if q == f"Where is the {s['colour']} {s['kind']}?")


SAME_FORMAT = {"price": r"\$\d+\.\d\d", "addon": r"\$\d+\.\d\d", "sum": r"\$\d+\.\d\d", "diff": r"\d+",
               "count": r"\d+", "colour": "red|blue|green|yellow|orange|purple"}


def test_every_answer_matches_its_facts_and_dpo_rejects_a_plausible_wrong_answer(tmp_path):
    generate(tmp_path, 50, seed=3, split_sizes={"val": 5, "test": 5, "test-novel": 10})
    qa = [r for s in SPLITS for r in records(tmp_path / s, "qa.jsonl")]
    dpo = {d["id"]: d for s in SPLITS for d in records(tmp_path / s, "dpo.jsonl")}
    kinds = set()
    for r in qa:
        assert derive(r) == r["answer"], r["id"]
        kinds.add(r["kind"])
        rejected = dpo[r["id"]]["rejected"]
        assert rejected != r["answer"] and rejected not in r["answers"], r["id"]
        if r["kind"] in SAME_FORMAT:
            assert re.fullmatch(SAME_FORMAT[r["kind"]], rejected), (r["id"], rejected)
        elif r["kind"] == "value":
            assert re.fullmatch(r"\d+%" if r["facts"]["chart"] == "pie" else r"\d+", rejected), rejected
        elif r["kind"] in ("argmax", "argmin"):
            assert rejected in r["facts"]["labels"]
        elif r["kind"] == "markdown":
            assert rejected.count("\n") == r["answer"].count("\n") and rejected.startswith("| ")
        elif r["kind"] == "json":
            assert [list(row) for row in json.loads(rejected)] == [list(row) for row in json.loads(r["answer"])]
        elif r["kind"] == "position":
            assert rejected in shapes.CELLS
        elif r["kind"] == "lookup":
            assert rejected in {c for row in r["facts"]["rows"] for c in row[1:]}
    assert kinds == {"price", "addon", "sum", "value", "argmax", "argmin", "diff", "lookup", "markdown", "json",
                     "transcribe", "line", "count", "colour", "position"}


def test_transcription_and_caption_hold_the_printed_values(out):
    for split in SPLITS:
        facts = {r["images"][0]: r["facts"] for r in records(out / split, "qa.jsonl")}
        for t in records(out / split, "transcribe.jsonl"):
            f = facts[t["images"][0]]
            body = t["messages"][1]["content"]
            if t["family"] == "menu":
                assert all(p in body for i in f["items"] for p in i["prices"]) and f["title"] in body
            if t["family"] == "chart":
                assert all(f"{label} {v}" in body for label, v in zip(f["labels"], f["values"]))
        for c in records(out / split, "captions.jsonl"):
            f = facts[c["image"]]
            if "items" in f:
                assert c["text"].startswith("A coffee menu") and all(i["name"] in c["text"] for i in f["items"])


# --- images: text is really drawn, legibly ------------------------------------------------------------------------
def menu_facts(price: str) -> dict:
    return {"title": "Corner Cafe", "sizes": ["small", "large"], "size_labels": ["Small", "Large"],
            "items": [{"name": "Latte", "prices": ["$3.50", price]}, {"name": "Mocha", "prices": ["$4.00", "$4.75"]},
                      {"name": "Espresso", "prices": ["$2.25", "$2.75"]}],
            "teas": [], "addons": [{"label": "Add ice", "phrase": "it to add ice", "price": "$1.00"}], "layout": "grid"}


def test_menu_image_is_drawn_and_changes_with_a_price():
    cfg = SynthConfig()
    style = render.Style("DejaVuSans", render.PALETTE["white"], 16, "left")

    def pixels(price):
        return np.asarray(menu.draw(menu_facts(price), style, random.Random(7), cfg), np.int16)

    a, b = pixels("$4.25"), pixels("$4.95")
    assert np.array_equal(a, pixels("$4.25"))
    dark = (a.mean(axis=2) < 100).sum()  # black ink on white paper
    assert dark > 1500, dark
    diff = np.abs(a - b).max(axis=2) > 60
    ys, xs = np.nonzero(diff)
    assert 20 < diff.sum() < 2000  # only the changed price differs...
    assert xs.min() > a.shape[1] // 2  # ...in the right-hand (Large) column


@pytest.mark.parametrize("name", sorted(render.FONTS))
def test_every_font_draws_capitals_at_least_min_cap_px_tall(name):
    f = render.font(name, 14)
    img = Image.new("L", (80, 80), 255)
    from PIL import ImageDraw
    ImageDraw.Draw(img).text((10, 10), "H", font=f, fill=0)
    rows = np.nonzero((np.asarray(img) < 128).any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 14


def test_missing_font_names_its_debian_package(monkeypatch):
    monkeypatch.setitem(render.FONTS, "DejaVuSans", ("/nonexistent/DejaVuSans.ttf", "fonts-dejavu-core"))
    render._font_at.cache_clear()
    try:
        with pytest.raises(InputError, match="apt-get install fonts-dejavu-core"):
            render.check_fonts(["DejaVuSans"])
    finally:
        render._font_at.cache_clear()


# --- user errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be a positive"), ({"n": -3}, "n must be a positive"),
    ({"families": ["menu", "pizza"]}, "unknown family 'pizza': choose from menu, chart"),
    ({"splits": ["train", "dev"]}, "unknown split 'dev': choose from train, val, test, test-novel"),
    ({"families": []}, "no family given"), ({"families": "menu,charts"}, "unknown family 'charts'"), ({"split_sizes": {"val": 0}}, r"split_sizes\['val'\] must be"),
])
def test_bad_arguments_raise_input_error(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate(tmp_path / "x", **{"n": 5, **kwargs})
    assert not (tmp_path / "x").exists()


def test_bad_config_raises_input_error():
    with pytest.raises(InputError, match="min_cap_px <= max_cap_px"):
        SynthConfig(min_cap_px=30, max_cap_px=20)
    with pytest.raises(InputError, match="min_items must be at least 2"):
        SynthConfig(min_items=1)


def test_refuses_a_folder_that_already_holds_output(out):
    with pytest.raises(InputError, match="already holds files"):
        generate(out, 5, split_sizes=SIZES)


# --- the command ---------------------------------------------------------------------------------------------
def test_cli_writes_the_set_and_prints_counts(tmp_path, capsys):
    from phi3v.cli import synth as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    rc = cli.run(p.parse_args(["--out", str(tmp_path / "o"), "--n", "4", "--families", "menu,chart",
                               "--split", "train,test-novel", "--seed", "2"]))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train: 4 images (menu 2, chart 2)" in printed and "test-novel: 2 images (menu 1, chart 1)" in printed
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.json", "test-novel", "train"]
    with pytest.raises(InputError, match="unknown family 'pie'"):
        cli.run(p.parse_args(["--out", str(tmp_path / "e"), "--n", "4", "--families", "menu,pie"]))


def test_training_readers_accept_every_file(out):
    from phi3v.data.records import BadRecords, read_records

    for split in SPLITS:
        folder, bad = out / split, BadRecords("error")
        for name, kind in (("qa.jsonl", "conversation"), ("transcribe.jsonl", "conversation"),
                           ("captions.jsonl", "caption"), ("dpo.jsonl", "preference")):
            recs, total = read_records(folder / name, kind, bad)
            assert len(recs) == total > 0
        assert recs[0].rejected != recs[0].chosen and recs[0].images[0].is_file()


def test_a_style_that_fits_nothing_is_redrawn_and_impossible_content_is_an_input_error():
    from phi3v.data.synth import make_sample
    from phi3v.recipes.nano import NANO_SYNTH

    # seed 0, train chart 1435: its first style (DejaVuSerif) fits none of 50 drawn charts in 288 px; the generator
    # used to stop the whole set there (at image 7176 of 8000) instead of drawing another style
    s = make_sample("train", "chart", 1435, 0, NANO_SYNTH)
    assert s.family == "chart" and s.facts["style"]["font"] != "DejaVuSerif"
    assert s.data.startswith((b"\x89PNG", b"\xff\xd8\xff"))
    with pytest.raises(InputError, match="never fits in max_side=40 px"):
        make_sample("train", "chart", 0, 0, SynthConfig(min_side=32, max_side=40, min_cap_px=14, max_cap_px=22))
