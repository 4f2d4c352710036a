"""Coloured shapes in a 3x3 layout; questions on a count, a colour and a position. No text is drawn."""

from __future__ import annotations

import math
import random

from .render import QA, SynthConfig, Style, render, wrong

HAS_TEXT = False
KINDS = ("circle", "square", "triangle", "diamond")
# colour name -> shades; test-novel shapes use only the "novel" shades (the names are the answers, so they are shared)
SHADES = {
    "train": {"red": ((215, 40, 40), (185, 30, 55)), "blue": ((40, 80, 210), (30, 60, 160)),
              "green": ((40, 160, 60), (30, 120, 45)), "yellow": ((240, 200, 30), (225, 210, 70)),
              "orange": ((245, 140, 30), (225, 115, 20)), "purple": ((140, 60, 180), (110, 40, 150))},
    "novel": {"red": ((240, 75, 60),), "blue": ((70, 125, 235),), "green": ((85, 185, 80),),
              "yellow": ((250, 225, 0),), "orange": ((255, 165, 65),), "purple": ((165, 95, 205),)},
}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
VARIANTS = {"top": ("top", "top center", "top middle"), "left": ("left", "middle left", "center left"),
            "center": ("center", "middle", "centre"), "right": ("right", "middle right", "center right"),
            "bottom": ("bottom", "bottom center", "bottom middle")}


def facts(rng: random.Random, vocab: str, cfg: SynthConfig) -> dict:
    n = rng.randint(max(1, cfg.min_items - 1), cfg.max_items)
    cells = rng.sample(range(9), n)
    shades, kinds = SHADES[vocab], rng.sample(KINDS, rng.randint(2, 4))  # fewer kinds: counts above 1
    items = []
    for cell in cells:
        colour = rng.choice(sorted(shades))
        items.append({"kind": rng.choice(kinds), "colour": colour, "rgb": list(rng.choice(shades[colour])),
                      "cell": cell, "scale": rng.uniform(0.45, 0.8), "jitter": [rng.uniform(-0.1, 0.1),
                                                                                rng.uniform(-0.1, 0.1)]})
    lo, hi = cfg.min_side - 64, cfg.max_side - 64
    return {"shapes": items, "size": [rng.randint(lo, hi), rng.randint(lo, hi)]}


def lines(f: dict) -> list[str]:
    return []


def draw(f: dict, style: Style, rng: random.Random, cfg: SynthConfig):
    w, h = f["size"]

    def layout(cap: int):
        ops = []
        for s in f["shapes"]:
            cw, ch = w / 3, h / 3
            cx = (s["cell"] % 3 + 0.5 + s["jitter"][0]) * cw
            cy = (s["cell"] // 3 + 0.5 + s["jitter"][1]) * ch
            r = s["scale"] * min(cw, ch) / 2
            colour = tuple(s["rgb"])
            if s["kind"] == "circle":
                ops.append(("ellipse", (cx - r, cy - r, cx + r, cy + r), colour))
            elif s["kind"] == "square":
                ops.append(("rect", (cx - r, cy - r, cx + r, cy + r), colour, None))
            else:
                corners = 3 if s["kind"] == "triangle" else 4
                ops.append(("polygon", [(cx + r * math.sin(2 * math.pi * k / corners),
                                         cy - r * math.cos(2 * math.pi * k / corners)) for k in range(corners)],
                            colour))
        return ops, (w, h)

    return render(layout, style, rng, cfg)


def questions(f: dict, rng: random.Random) -> list[QA]:
    shapes_ = f["shapes"]
    out = []
    kind = rng.choice([s["kind"] for s in shapes_]) if rng.random() < 0.8 else rng.choice(KINDS)
    count = sum(s["kind"] == kind for s in shapes_)
    ans = str(count)
    out.append(QA("count", f"How many {kind}s are there?", ans, (ans,), str(count + 1 if count == 0 or
                                                                          rng.random() < 0.5 else count - 1)))
    unique = [s for s in shapes_ if sum(t["kind"] == s["kind"] for t in shapes_) == 1]
    if unique:
        s = rng.choice(unique)
        others = [t["colour"] for t in shapes_ if t["colour"] != s["colour"]]
        out.append(QA("colour", f"What colour is the {s['kind']}?", s["colour"], (s["colour"], ),
                      wrong(s["colour"], others, "red" if s["colour"] != "red" else "blue")))
    named = [s for s in shapes_ if sum((t["kind"], t["colour"]) == (s["kind"], s["colour"]) for t in shapes_) == 1]
    if not named:
        return out
    s = rng.choice(named)
    ans = CELLS[s["cell"]]
    row, col = divmod(s["cell"], 3)
    near = [CELLS[r * 3 + c] for r, c in ((row, col - 1), (row, col + 1), (row - 1, col), (row + 1, col))
            if 0 <= r < 3 and 0 <= c < 3]
    out.append(QA("position", f"Where is the {s['colour']} {s['kind']}?", ans, VARIANTS.get(ans, (ans,)),
                  rng.choice(near)))
    return out


def caption(f: dict) -> str:
    parts = ", ".join(f"a {s['colour']} {s['kind']} at the {CELLS[s['cell']]}" for s in f["shapes"])
    return f"{len(f['shapes'])} shapes on a plain background: {parts}."
