"""Bar, horizontal bar, line and pie charts with printed values; questions on a value, the max/min, a difference."""

from __future__ import annotations

import random

from .render import QA, SynthConfig, Style, font, render, text_size, wrong

HAS_TEXT = True
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (category noun, labels, ordered?) and measures; test-novel charts use only the "novel" half.
VOCAB = {
    "train": {
        "categories": (("month", MONTHS, True), ("day", DAYS, True),
                       ("fruit", ("Apple", "Banana", "Cherry", "Grape", "Lemon", "Mango", "Orange", "Peach"), False),
                       ("team", ("Lions", "Tigers", "Bears", "Eagles", "Wolves", "Sharks", "Hawks"), False),
                       ("product", ("Pens", "Books", "Lamps", "Chairs", "Mugs", "Bags", "Clocks"), False)),
        "measures": ("sales", "visitors", "orders", "votes"),
    },
    "novel": {
        "categories": (("planet", ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"), True),
                       ("tree", ("Oak", "Pine", "Maple", "Birch", "Cedar", "Willow"), False),
                       ("region", ("North", "South", "East", "West", "Central"), False),
                       ("instrument", ("Piano", "Guitar", "Violin", "Drums", "Flute", "Cello"), False)),
        "measures": ("revenue", "members", "downloads"),
    },
}
KINDS = ("bar", "hbar", "line", "pie")


def facts(rng: random.Random, vocab: str, cfg: SynthConfig) -> dict:
    v = VOCAB[vocab]
    noun, words, ordered = rng.choice(v["categories"])
    n = min(len(words), rng.randint(cfg.min_items, cfg.max_items))
    if ordered:
        start = rng.randrange(len(words) - n + 1)
        labels = list(words[start:start + n])
    else:
        labels = rng.sample(words, n)
    kind = rng.choice(KINDS)
    if kind == "pie":  # distinct shares of at least 5% that add up to 100
        while True:
            cuts = sorted(rng.sample(range(5, 96), n - 1))
            values = [b - a for a, b in zip([0, *cuts], [*cuts, 100])]
            if min(values) >= 5 and len(set(values)) == n:
                break
    else:
        values = rng.sample(range(rng.choice((1, 5, 10)), rng.choice((60, 100, 200))), n)
    measure = rng.choice(v["measures"])
    return {"chart": kind, "noun": noun, "measure": measure, "title": f"{measure.capitalize()} by {noun}",
            "labels": labels, "values": values, "unit": "%" if kind == "pie" else "",
            "plot": [rng.randint(140, 260), rng.randint(180, 320)], "colours": rng.sample(range(6), 6),
            "one_colour": rng.random() < 0.5, "grid": rng.random() < 0.5}


def shown(f: dict, i: int) -> str:
    return f"{f['values'][i]}{f['unit']}"


def lines(f: dict) -> list[str]:
    """Title, then each category with its printed value, in reading order."""
    return [f["title"]] + [f"{label} {shown(f, i)}" for i, label in enumerate(f["labels"])]


def draw(f: dict, style: Style, rng: random.Random, cfg: SynthConfig):
    pal = style.palette
    colours = [pal.series[c] for c in f["colours"]]
    fill = [colours[0] if f["one_colour"] else colours[i % 6] for i in range(len(f["labels"]))]
    plot_h, plot_w = f["plot"]
    n, top = len(f["labels"]), max(f["values"])

    def layout(cap: int):
        body, head = font(style.font, cap), font(style.font, int(cap * 1.3))
        lh = text_size(body, "Hg")[1]
        ops, tw = [], text_size(head, f["title"])[0]
        y0 = int(text_size(head, "Hg")[1] * 1.6)
        lw = max(text_size(body, s)[0] for s in f["labels"])
        vw = max(text_size(body, shown(f, i))[0] for i in range(n))
        if f["chart"] in ("bar", "line"):
            slot = max(lw + cap, vw + cap, cap * 3)
            r = max(3, cap // 4)  # line chart: dot radius
            w, base = slot * n, y0 + lh + r + 4 + plot_h  # base: y of the x axis
            pts = [(i * slot + slot // 2, base - int(plot_h * f["values"][i] / top)) for i in range(n)]
            if f["chart"] == "line":
                ops.append(("line", pts, colours[0], max(2, cap // 6)))
                ops += [("ellipse", (x - r, y - r, x + r, y + r), colours[0]) for x, y in pts]
            for i, (cx, y) in enumerate(pts):
                s, sw = shown(f, i), text_size(body, shown(f, i))[0]
                if f["chart"] == "bar":
                    ops.append(("rect", (cx - slot // 3, y, cx + slot // 3, base), fill[i], None))
                else:  # a paper-coloured box keeps the value clear of the line
                    ops.append(("rect", (cx - sw // 2 - 2, y - lh - r - 2, cx + sw // 2 + 2, y - r - 2), pal.paper,
                                None))
                ops.append(("text", cx - sw // 2, y - lh - r - 2, s, body, pal.ink))
                ops.append(("text", cx - text_size(body, f["labels"][i])[0] // 2, base + 4, f["labels"][i], body,
                            pal.ink))
            ops.append(("line", [(0, base), (w, base)], pal.ink, 1))
            h = base + lh + 6
        elif f["chart"] == "hbar":
            row = int(lh * 1.5)
            w, x0 = lw + cap + plot_w + cap // 2 + vw, lw + cap
            for i in range(n):
                y, length = y0 + i * row, max(2, int(plot_w * f["values"][i] / top))
                ops.append(("text", x0 - cap // 2 - text_size(body, f["labels"][i])[0], y, f["labels"][i], body,
                            pal.ink))
                ops.append(("rect", (x0, y + lh // 8, x0 + length, y + lh - lh // 8), fill[i], None))
                ops.append(("text", x0 + length + cap // 2, y, shown(f, i), body, pal.ink))
            ops.append(("line", [(x0, y0 - 4), (x0, y0 + n * row)], pal.ink, 1))
            h = y0 + n * row
        else:  # pie with a legend: swatch, label, share
            d, row = plot_h, int(lh * 1.4)
            angle = -90.0
            for i in range(n):
                sweep = 360.0 * f["values"][i] / 100
                ops.append(("pie", (0, y0, d, y0 + d), angle, angle + sweep, colours[i % 6]))
                angle += sweep
            lx, ly = d + cap * 2, y0 + max(0, (d - n * row) // 2)
            for i in range(n):
                y = ly + i * row
                ops.append(("rect", (lx, y + lh // 4, lx + lh // 2, y + lh // 4 + lh // 2), colours[i % 6], None))
                ops.append(("text", lx + lh, y, f"{f['labels'][i]} {shown(f, i)}", body, pal.ink))
            w = lx + lh + max(text_size(body, f"{s} {shown(f, i)}")[0] for i, s in enumerate(f["labels"]))
            h = y0 + max(d, n * row)
        w = max(w, tw)
        ops.insert(0, ("text", {"left": 0, "center": (w - tw) // 2, "right": w - tw}[style.align], 0,
                       f["title"], head, pal.accent))
        return ops, (w, h)

    return render(layout, style, rng, cfg)


def questions(f: dict, rng: random.Random) -> list[QA]:
    labels_, values, noun, measure = f["labels"], f["values"], f["noun"], f["measure"]
    n, pie = len(labels_), f["chart"] == "pie"
    out = []
    i = rng.randrange(n)
    near = [shown(f, j) for j in (i - 1, i + 1) if 0 <= j < n]
    q = f"What is the share of {labels_[i]}?" if pie else rng.choice(
        (f"What is the value for {labels_[i]}?", f"How many {measure} did {labels_[i]} have?"))
    out.append(QA("value", q, shown(f, i), _variants(shown(f, i)), wrong(shown(f, i), near, str(values[i] + 1))))
    order = sorted(range(n), key=lambda j: values[j])  # values are distinct: no ties
    top = rng.random() < 0.5
    best, runner = (order[-1], order[-2]) if top else (order[0], order[1])  # runner-up: the rejected answer
    if pie:
        q = f"Which {noun} has the {'largest' if top else 'smallest'} share?"
    else:
        q = f"Which {noun} had the {'highest' if top else 'lowest'} {measure}?"
    out.append(QA("argmax" if top else "argmin", q, labels_[best], (labels_[best],), labels_[runner]))
    if not pie:
        a, b = rng.sample(range(n), 2)
        ans = str(abs(values[a] - values[b]))
        alt = [str(abs(values[j] - values[b])) for j in (a - 1, a + 1) if 0 <= j < n and j != b]
        q = f"What is the difference between the {measure} of {labels_[a]} and {labels_[b]}?"
        out.append(QA("diff", q, ans, (ans,), wrong(ans, alt, str(int(ans) + 1))))
    return out


def caption(f: dict) -> str:
    kind = {"bar": "A bar chart", "hbar": "A horizontal bar chart", "line": "A line chart", "pie": "A pie chart"}
    parts = ", ".join(f"{label} {shown(f, i)}" for i, label in enumerate(f["labels"]))
    return f"{kind[f['chart']]} titled \"{f['title']}\" showing {f['measure']} per {f['noun']}: {parts}."


def _variants(s: str) -> tuple[str, ...]:
    return (s, s[:-1]) if s.endswith("%") else (s,)
