"""Printed lines to read (words, prices, short phrases): the transcription warm-up; whole-text and line questions."""

from __future__ import annotations

import random

from .render import QA, SynthConfig, Style, font, money, render, text_size, wrong

HAS_TEXT = True
VOCAB = {
    "train": ("apple", "river", "window", "garden", "yellow", "market", "coffee", "summer", "paper", "stone",
              "morning", "silver", "candle", "bridge", "forest", "ticket", "pencil", "orange", "winter", "basket",
              "rocket", "little", "bright", "simple", "planet", "letter", "castle", "mirror", "button", "pocket",
              "cookie", "pillow", "island", "sunset", "harbor", "meadow", "violet", "copper", "marble", "lemon",
              "open", "daily", "fresh", "sale", "today", "hours", "menu", "price", "store", "free", "new", "hot",
              "cold", "sweet", "blue", "green", "red", "small", "large", "best", "fast", "home", "shop", "book"),
    "novel": ("quartz", "zephyr", "jungle", "walrus", "vortex", "oxygen", "gadget", "kitten", "puzzle", "hazel",
              "nimble", "cobalt", "falcon", "wizard", "banjo", "tundra", "yogurt", "jacket", "velvet", "maze"),
}


def facts(rng: random.Random, vocab: str, cfg: SynthConfig) -> dict:
    words = VOCAB[vocab]
    out = []
    for _ in range(rng.randint(max(1, cfg.min_items - 1), max(1, cfg.max_items - 1))):
        kind = rng.random()
        phrase = [rng.choice(words) for _ in range(rng.randint(1, 3))]
        case = rng.choice((str.lower, str.capitalize, str.title, str.upper))
        line = case(" ".join(phrase))
        if kind < 0.3:
            line = f"{line} {money(rng.randrange(50, 5000, 5))}"
        elif kind < 0.45:
            line = f"{line} {rng.randrange(1, 100)}"
        out.append(line)
    return {"lines": out, "spacing": rng.uniform(1.2, 1.8)}


def lines(f: dict) -> list[str]:
    return list(f["lines"])


def draw(f: dict, style: Style, rng: random.Random, cfg: SynthConfig):
    def layout(cap: int):
        body = font(style.font, cap)
        row = int(text_size(body, "Hg")[1] * f["spacing"])
        widths = [text_size(body, s)[0] for s in f["lines"]]
        w = max(widths)
        ops = [("text", {"left": 0, "center": (w - lw) // 2, "right": w - lw}[style.align], i * row, s, body,
                style.palette.ink) for i, (s, lw) in enumerate(zip(f["lines"], widths))]
        return ops, (w, row * (len(f["lines"]) - 1) + text_size(body, "Hg")[1])

    return render(layout, style, rng, cfg)


def questions(f: dict, rng: random.Random) -> list[QA]:
    text = "\n".join(f["lines"])
    out = [QA("transcribe", "What text is printed in the image?", text, (text,), _typo(text, rng))]
    if len(f["lines"]) >= 2:
        i = rng.randrange(len(f["lines"]))
        near = [f["lines"][j] for j in (i + 1, i - 1) if 0 <= j < len(f["lines"])]
        out.append(QA("line", f"What is written on line {i + 1}?", f["lines"][i], (f["lines"][i],),
                      wrong(f["lines"][i], near, _typo(f["lines"][i], rng))))
    return out


def caption(f: dict) -> str:
    return f"Printed text in {len(f['lines'])} lines: " + " / ".join(f["lines"]) + "."


def _typo(s: str, rng: random.Random) -> str:
    """s with one letter changed: a near miss in the same format."""
    spots = [i for i, ch in enumerate(s) if ch.isalpha()]
    i = rng.choice(spots)
    ch = s[i]
    new = "e" if ch.lower() != "e" else "a"
    return s[:i] + (new.upper() if ch.isupper() else new) + s[i + 1:]
