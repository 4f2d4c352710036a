"""What ships inside the package: the phi3v-nano model and example images, so the first command needs no download.

`python -m phi3v.examples` redraws `assets/example_chart.png` with `draw_example_chart()`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import CheckpointError, Phi3VError

ASSETS = Path(__file__).resolve().parent / "assets"
NANO_DIR = ASSETS / "phi3v-nano"  # the bundled model (`phi3v recipe nano`), the default of every command
EXAMPLE_MENU = ASSETS / "menu.png"  # a held-out menu drawn by `phi3v synth`, with menu.json: its question and answer
EXAMPLE_CHART = ASSETS / "example_chart.png"
CHART_SIZE = (640, 420)  # (width, height): 2 x 2 HD crops (757 image tokens) with num_crops 4
TITLE = "Rainfall in Greenfield, January to June"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun")
RAINFALL_MM = (78, 64, 52, 41, 30, 12)  # made-up values, printed above the bars


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def draw_example_chart() -> Image.Image:
    """The example chart as an RGB image: title, y axis with gridlines, one labelled bar per month (deterministic)."""
    W, H = CHART_SIZE
    img = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(img)
    title, label, small = _font(24), _font(18), _font(15)
    left, right, top, bottom = 90, W - 30, 70, H - 70  # plot area
    y_max = 100
    draw.text((W // 2, 20), TITLE, fill="black", font=title, anchor="mt")
    for v in range(0, y_max + 1, 20):  # gridlines and y tick labels
        y = bottom - (bottom - top) * v // y_max
        draw.line([(left, y), (right, y)], fill=(220, 220, 220))
        draw.text((left - 8, y), str(v), fill="black", font=small, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    slot = (right - left) // len(MONTHS)
    for i, (month, mm) in enumerate(zip(MONTHS, RAINFALL_MM)):
        x0 = left + i * slot + slot // 5
        x1 = left + (i + 1) * slot - slot // 5
        y = bottom - (bottom - top) * mm // y_max
        draw.rectangle([x0, y, x1, bottom - 1], fill=(52, 101, 164), outline=(32, 74, 135))
        draw.text(((x0 + x1) // 2, y - 4), str(mm), fill="black", font=small, anchor="md")
        draw.text(((x0 + x1) // 2, bottom + 8), month, fill="black", font=small, anchor="mt")
    draw.text(((left + right) // 2, H - 12), "Month", fill="black", font=label, anchor="md")
    axis = Image.new("RGB", (bottom - top, 24), "white")  # the y label, drawn flat then rotated
    ImageDraw.Draw(axis).text(((bottom - top) // 2, 12), "Rainfall (mm)", fill="black", font=label, anchor="mm")
    img.paste(axis.rotate(90, expand=True), (10, top))
    return img


def nano_dir() -> Path:
    """The bundled phi3v-nano checkpoint folder (the default model)."""
    if not (NANO_DIR / "config.json").is_file():
        raise CheckpointError(f"the bundled phi3v-nano model is missing ({NANO_DIR} has no config.json): reinstall "
                              "phi3v, or pass a checkpoint folder with --model")
    return NANO_DIR


def example_menu() -> tuple[Path, str, str]:
    """(image, question, answer) of the bundled example menu."""
    import json

    qa = json.loads((ASSETS / "menu.json").read_text())
    return EXAMPLE_MENU, qa["question"], qa["answer"]


def example_image(path: str | Path | None = None) -> Path:
    """Path of the bundled example chart PNG (640x420); with `path`, a copy written there instead."""
    if not EXAMPLE_CHART.is_file():
        raise Phi3VError(f"the bundled example image {EXAMPLE_CHART} is missing; reinstall phi3v "
                         "or run `python -m phi3v.examples` to redraw it")
    if path is None:
        return EXAMPLE_CHART
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_CHART, path)
    return path


if __name__ == "__main__":
    EXAMPLE_CHART.parent.mkdir(exist_ok=True)
    draw_example_chart().save(EXAMPLE_CHART, optimize=True)
