"""Tables of 2-5 rows; questions look up a cell or ask for the whole table as canonical Markdown or JSON.

Canonical Markdown: `| h1 | h2 |`, then `| --- | --- |`, then one `| c1 | c2 |` line per row, joined by "\\n",
no trailing newline, cells exactly as printed. Canonical JSON: `json.dumps([{h1: c1, h2: c2}, ...],
ensure_ascii=False)` (one object per row, keys in column order, every value the printed string).
"""

from __future__ import annotations

import json
import random

from .render import QA, SynthConfig, Style, font, money, render, text_size

HAS_TEXT = True
# topic: key column, its label words per vocabulary half, value columns (header, question noun, value maker)
VOCAB = {
    "train": {
        "city": ("Oslo", "Paris", "Madrid", "Vienna", "Dublin", "Lisbon", "Prague", "Warsaw", "Athens", "Berlin"),
        "person": ("Maria", "James", "Aisha", "Tom", "Lena", "Omar", "Sofia", "Jack"),
        "product": ("Stapler", "Notebook", "Backpack", "Scissors", "Marker", "Folder"),
    },
    "novel": {
        "city": ("Quito", "Hanoi", "Nairobi", "Lima", "Perth", "Tallinn", "Bergen", "Porto"),
        "person": ("Ravi", "Yuki", "Elena", "Kofi", "Ingrid", "Mateo"),
        "product": ("Kettle", "Blender", "Toaster", "Whisk", "Ladle"),
    },
}
COLUMNS = {
    "city": ("City", (("Population", "population", lambda r: f"{r.randrange(50_000, 3_000_000, 1000):,}"),
                      ("Area", "area", lambda r: f"{r.randrange(50, 900)} km2"),
                      ("Founded", "founding year", lambda r: str(r.randrange(800, 1900))))),
    "person": ("Name", (("Score", "score", lambda r: str(r.randrange(40, 100))),
                        ("Age", "age", lambda r: str(r.randrange(18, 70))),
                        ("Team", "team", lambda r: r.choice(("Red", "Blue", "Green", "Gold"))))),
    "product": ("Product", (("Price", "price", lambda r: money(r.randrange(150, 5000, 5))),
                            ("Stock", "stock", lambda r: str(r.randrange(0, 400))),
                            ("Code", "code", lambda r: f"{r.choice('ABCDEFGHJK')}{r.randrange(100, 999)}"))),
}


def facts(rng: random.Random, vocab: str, cfg: SynthConfig) -> dict:
    topic = rng.choice(sorted(COLUMNS))
    key, cols = COLUMNS[topic]
    cols = rng.sample(cols, rng.randint(1, 2))
    n = min(len(VOCAB[vocab][topic]), rng.randint(max(2, cfg.min_items - 1), max(2, cfg.max_items - 1)))
    rows = [[name] + [make(rng) for _, _, make in cols] for name in rng.sample(VOCAB[vocab][topic], n)]
    return {"topic": topic, "header": [key] + [c[0] for c in cols], "nouns": [c[1] for c in cols], "rows": rows,
            "rules": rng.choice(("grid", "lines", "zebra")), "numbers_right": rng.random() < 0.7}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """The canonical Markdown rendering (see the module docstring)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_json(header: list[str], rows: list[list[str]]) -> str:
    """The canonical JSON rendering (see the module docstring)."""
    return json.dumps([dict(zip(header, r)) for r in rows], ensure_ascii=False)


def lines(f: dict) -> list[str]:
    return [" ".join(f["header"])] + [" ".join(r) for r in f["rows"]]


def draw(f: dict, style: Style, rng: random.Random, cfg: SynthConfig):
    pal = style.palette
    table = [f["header"]] + f["rows"]

    def layout(cap: int):
        body = font(style.font, cap)
        lh = text_size(body, "Hg")[1]
        pad, row = cap, int(lh * 1.6)
        widths = [max(text_size(body, r[c])[0] for r in table) + 2 * pad for c in range(len(f["header"]))]
        w, h = sum(widths), row * len(table)
        ops = []
        if f["rules"] == "zebra":
            ops += [("rect", (0, r * row, w, (r + 1) * row), _tint(pal.paper, pal.accent), None)
                    for r in range(2, len(table), 2)]
        for r, cells in enumerate(table):
            x = 0
            for c, cell in enumerate(cells):
                cw = text_size(body, cell)[0]
                right = f["numbers_right"] and c > 0 and r > 0 and any(ch.isdigit() for ch in cell)
                tx = x + widths[c] - pad - cw if right else x + pad
                ops.append(("text", tx, r * row + (row - lh) // 2, cell, body, pal.accent if r == 0 else pal.ink))
                x += widths[c]
        rule = max(1, cap // 10)
        ys = range(len(table) + 1) if f["rules"] == "grid" else (0, 1, len(table))
        ops += [("line", [(0, y * row), (w, y * row)], pal.ink, rule) for y in ys]
        if f["rules"] == "grid":
            xs = [sum(widths[:c]) for c in range(len(widths) + 1)]
            ops += [("line", [(x, 0), (x, h)], pal.ink, rule) for x in xs]
        return ops, (w + rule, h + rule)

    return render(layout, style, rng, cfg)


def questions(f: dict, rng: random.Random) -> list[QA]:
    header, rows = f["header"], f["rows"]
    out = []
    r, c = rng.randrange(len(rows)), rng.randrange(1, len(header))
    ans = rows[r][c]
    others = [rows[k][c] for k in range(len(rows)) if k != r] + [rows[r][k] for k in range(1, len(header)) if k != c]
    variants = (ans, ans.replace(",", "")) if "," in ans else (ans, ans[1:]) if ans.startswith("$") else (ans,)
    out.append(QA("lookup", f"What is the {f['nouns'][c - 1]} of {rows[r][0]}?", ans, variants,
                  next((o for o in others if o != ans), ans + "0")))
    # the rejected conversion swaps two cells of one column: plausible, same format, wrong
    swapped = [list(row) for row in rows]
    a, b = 0, 1
    swapped[a][c], swapped[b][c] = rows[b][c], rows[a][c]
    if swapped == rows:
        swapped[a][0] = rows[a][0] + "s"
    kind = rng.choice(("markdown", "json"))
    if kind == "markdown":
        ans = markdown(header, rows)
        out.append(QA("markdown", "Convert the table to Markdown.", ans, (ans,), markdown(header, swapped)))
    else:
        ans = to_json(header, rows)
        out.append(QA("json", "Convert the table to JSON.", ans, (ans,), to_json(header, swapped)))
    return out


def caption(f: dict) -> str:
    cols = " and ".join(f["nouns"])
    rows = "; ".join(f"{r[0]}: " + ", ".join(r[1:]) for r in f["rows"])
    return f"A table of {len(f['rows'])} rows giving the {cols} of each {f['topic']}: {rows}."


def _tint(paper, accent):
    return tuple(int(p * 0.88 + a * 0.12) for p, a in zip(paper, accent))
