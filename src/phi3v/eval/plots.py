"""The report's bar chart (overall and per-category scores) as a PNG, drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BAR_H, GAP, LABEL_W, BAR_W, PAD = 22, 6, 220, 360, 12


def bar_chart(rep: dict, path: str | Path) -> Path:
    """Horizontal bars, one per category after the overall score; scores are fractions in [0, 1]."""
    rows = [("overall", float(rep["overall"]))] + [(str(k), float(v)) for k, v in rep["categories"].items()]
    font = ImageFont.load_default()
    height = PAD * 3 + BAR_H + len(rows) * (BAR_H + GAP)
    img = Image.new("RGB", (LABEL_W + BAR_W + 80 + 2 * PAD, height), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), f"{rep['task']}: {rep['metric']} (n={rep['n']})", fill="black", font=font)
    y = PAD * 2 + BAR_H
    for k, (name, score) in enumerate(rows):
        d.text((PAD, y + 5), name[:34], fill="black", font=font)
        x0 = PAD + LABEL_W
        d.rectangle([x0, y, x0 + BAR_W, y + BAR_H], outline=(200, 200, 200))
        width = round(BAR_W * min(max(score, 0.0), 1.0))
        if width:
            d.rectangle([x0, y, x0 + width, y + BAR_H], fill=(40, 90, 160) if k else (200, 100, 30))
        d.text((x0 + BAR_W + 8, y + 5), f"{100 * score:.1f}", fill="black", font=font)
        y += BAR_H + GAP
    path = Path(path)
    img.save(path, format="PNG")
    return path
