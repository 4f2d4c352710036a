"""Shared drawing pieces: the knobs (SynthConfig), fonts and palettes partitioned by split, paper, augmentation."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ...errors import InputError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator; defaults keep text legible for a tiny model (320-640 px, cap height >= 14 px)."""

    min_side: int = 320  # long side of an image, px
    max_side: int = 640
    min_cap_px: int = 14  # cap height ("H") of the smallest text, px
    max_cap_px: int = 22
    min_items: int = 3  # menu items, bars, table rows (tables use min_items - 1), text lines - 1
    max_items: int = 6
    max_rotate_deg: float = 2.0
    max_perspective: float = 0.015  # corner shift as a fraction of the side
    max_blur: float = 0.7  # Gaussian radius, px
    max_noise: float = 6.0  # per-pixel noise std, 0-255 scale
    noise_prob: float = 0.3  # per-pixel noise makes PNGs 2-3x larger, so it is drawn less often than blur
    grain: float = 2.0  # paper texture std
    jpeg_prob: float = 0.35  # chance an image is stored as JPEG
    jpeg_quality: tuple[int, int] = (70, 95)
    augment_prob: float = 0.8  # chance of rotation/perspective/blur/noise on an image
    frame_prob: float = 0.25  # chance the page lies on a darker surface (a photo of a document), as SynthDoG does

    def __post_init__(self):
        for lo, hi in (("min_side", "max_side"), ("min_cap_px", "max_cap_px"), ("min_items", "max_items")):
            if not 0 < getattr(self, lo) <= getattr(self, hi):
                raise InputError(f"SynthConfig needs 0 < {lo} <= {hi}, got {getattr(self, lo)} and {getattr(self, hi)}")
        if self.min_items < 2:
            raise InputError("SynthConfig.min_items must be at least 2 (a chart needs two bars to compare)")


# --- fonts: found by path from a fixed list, partitioned into training fonts and test-novel fonts -------------------
DEJAVU = "/usr/share/fonts/truetype/dejavu"
LIBERATION = "/usr/share/fonts/truetype/liberation"
PILLOW_DEFAULT = "pillow-default"  # ImageFont.load_default(size): Pillow's bundled font

# name -> (path, Debian package that provides it)
FONTS: dict[str, tuple[str, str]] = {
    "DejaVuSans": (f"{DEJAVU}/DejaVuSans.ttf", "fonts-dejavu-core"),
    "DejaVuSans-Bold": (f"{DEJAVU}/DejaVuSans-Bold.ttf", "fonts-dejavu-core"),
    "DejaVuSerif": (f"{DEJAVU}/DejaVuSerif.ttf", "fonts-dejavu-core"),
    "DejaVuSansMono": (f"{DEJAVU}/DejaVuSansMono.ttf", "fonts-dejavu-core"),
    "DejaVuSansCondensed": (f"{DEJAVU}/DejaVuSansCondensed.ttf", "fonts-dejavu-extra"),
    "LiberationSans-Regular": (f"{LIBERATION}/LiberationSans-Regular.ttf", "fonts-liberation"),
    "LiberationSans-Bold": (f"{LIBERATION}/LiberationSans-Bold.ttf", "fonts-liberation"),
    "LiberationSerif-Regular": (f"{LIBERATION}/LiberationSerif-Regular.ttf", "fonts-liberation"),
    "LiberationMono-Regular": (f"{LIBERATION}/LiberationMono-Regular.ttf", "fonts-liberation"),
    "LiberationSansNarrow-Regular": (f"{LIBERATION}/LiberationSansNarrow-Regular.ttf", "fonts-liberation"),
    PILLOW_DEFAULT: (PILLOW_DEFAULT, "python3-pil (bundled with Pillow)"),
    # test-novel only
    "DejaVuSerif-Bold": (f"{DEJAVU}/DejaVuSerif-Bold.ttf", "fonts-dejavu-core"),
    "DejaVuSansMono-Bold": (f"{DEJAVU}/DejaVuSansMono-Bold.ttf", "fonts-dejavu-core"),
    "DejaVuSerifCondensed": (f"{DEJAVU}/DejaVuSerifCondensed.ttf", "fonts-dejavu-extra"),
    "LiberationSerif-Bold": (f"{LIBERATION}/LiberationSerif-Bold.ttf", "fonts-liberation"),
    "LiberationSansNarrow-Bold": (f"{LIBERATION}/LiberationSansNarrow-Bold.ttf", "fonts-liberation"),
    "LiberationSans-Italic": (f"{LIBERATION}/LiberationSans-Italic.ttf", "fonts-liberation"),
}
NOVEL_FONTS = ("DejaVuSerif-Bold", "DejaVuSansMono-Bold", "DejaVuSerifCondensed", "LiberationSerif-Bold",
               "LiberationSansNarrow-Bold", "LiberationSans-Italic")
TRAIN_FONTS = tuple(name for name in FONTS if name not in NOVEL_FONTS)


@lru_cache(maxsize=None)
def _font_at(name: str, size: int) -> ImageFont.FreeTypeFont:
    path, package = FONTS[name]
    if path == PILLOW_DEFAULT:
        return ImageFont.load_default(size)
    if not Path(path).is_file():
        raise InputError(f"font file {path} is missing: install the Debian package {package} "
                         f"(apt-get install {package}) to run phi3v synth")
    return ImageFont.truetype(path, size)


@lru_cache(maxsize=None)
def font(name: str, cap_px: int) -> ImageFont.FreeTypeFont:
    """The font `name` at the smallest size whose capital H is at least cap_px tall."""
    top, bottom = _font_at(name, 100).getbbox("H")[1::2]
    size = max(6, int(cap_px * 100 / (bottom - top)))
    while _cap(_font_at(name, size)) < cap_px:
        size += 1
    return _font_at(name, size)


def _cap(f: ImageFont.FreeTypeFont) -> int:
    box = f.getbbox("H")
    return box[3] - box[1]


def check_fonts(names) -> None:
    """Raise InputError naming the Debian package of the first listed font file that is missing."""
    for name in names:
        _font_at(name, 20)


# --- palettes: paper, ink, accent and series colours; test-novel palettes are never used in training --------------
@dataclass(frozen=True)
class Palette:
    name: str
    paper: RGB
    ink: RGB
    accent: RGB
    series: tuple[RGB, ...]


PALETTES = (
    Palette("cream", (250, 245, 230), (30, 30, 30), (120, 60, 20),
            ((200, 80, 60), (60, 120, 180), (90, 160, 90), (220, 160, 40), (140, 90, 170), (80, 80, 80))),
    Palette("white", (255, 255, 255), (0, 0, 0), (30, 70, 150),
            ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))),
    Palette("slate", (235, 238, 242), (20, 30, 45), (50, 90, 130),
            ((70, 110, 160), (200, 110, 70), (110, 160, 120), (170, 90, 130), (210, 180, 70), (90, 90, 120))),
    Palette("chalk", (40, 45, 42), (240, 240, 235), (240, 200, 120),
            ((240, 150, 120), (130, 200, 230), (180, 230, 140), (240, 220, 120), (210, 160, 230), (200, 200, 200))),
    Palette("kraft", (222, 200, 165), (45, 30, 20), (110, 40, 30),
            ((150, 60, 40), (60, 90, 110), (100, 120, 50), (170, 120, 40), (110, 70, 100), (70, 60, 50))),
    Palette("mint", (236, 248, 240), (20, 50, 40), (20, 110, 90),
            ((30, 130, 110), (230, 120, 90), (90, 110, 180), (200, 170, 60), (150, 90, 150), (60, 70, 70))),
    Palette("night", (25, 30, 50), (235, 235, 250), (120, 200, 255),
            ((100, 180, 255), (255, 160, 90), (140, 230, 150), (255, 110, 140), (200, 170, 255), (230, 230, 120))),
    Palette("rose", (252, 238, 240), (60, 20, 30), (160, 40, 80),
            ((180, 50, 90), (70, 120, 170), (120, 160, 90), (230, 150, 60), (120, 80, 160), (100, 80, 80))),
    # test-novel only
    Palette("sepia", (240, 226, 200), (70, 45, 25), (140, 90, 40),
            ((160, 110, 60), (90, 110, 130), (130, 140, 80), (190, 140, 90), (120, 90, 110), (100, 80, 60))),
    Palette("ocean", (225, 240, 250), (10, 40, 70), (0, 90, 140),
            ((0, 100, 160), (250, 140, 50), (60, 170, 140), (200, 60, 90), (120, 100, 200), (90, 110, 120))),
    Palette("ink-on-yellow", (255, 248, 190), (25, 25, 60), (160, 30, 30),
            ((40, 60, 160), (190, 40, 40), (30, 130, 60), (200, 120, 0), (110, 40, 140), (60, 60, 60))),
)
NOVEL_PALETTES = ("sepia", "ocean", "ink-on-yellow")
TRAIN_PALETTES = tuple(p.name for p in PALETTES if p.name not in NOVEL_PALETTES)
PALETTE = {p.name: p for p in PALETTES}


def is_novel(split: str) -> bool:
    return split == "test-novel"


def split_fonts(split: str) -> tuple[str, ...]:
    return NOVEL_FONTS if is_novel(split) else TRAIN_FONTS


def split_palettes(split: str) -> tuple[str, ...]:
    return NOVEL_PALETTES if is_novel(split) else TRAIN_PALETTES


@dataclass(frozen=True)
class Style:
    """How one image looks: its font, palette, text size and alignment."""

    font: str
    palette: Palette
    cap_px: int
    align: str  # "left" | "center" | "right"


def draw_style(rng: random.Random, split: str, cfg: SynthConfig) -> Style:
    return Style(font=rng.choice(split_fonts(split)), palette=PALETTE[rng.choice(split_palettes(split))],
                 cap_px=rng.randint(cfg.min_cap_px, cfg.max_cap_px), align=rng.choice(("left", "center", "right")))


class NoFit(Exception):
    """The drawn content does not fit in cfg.max_side at the smallest text size; the caller draws new facts."""


# --- drawing helpers -----------------------------------------------------------------------------------------------
def text_size(f: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    """(width, line height) of one line: the height is the font's ascent + descent, so rows line up."""
    ascent, descent = f.getmetrics()
    return int(np.ceil(f.getlength(text))), ascent + descent


def aligned_x(align: str, left: int, width: int, text_w: int) -> int:
    return {"left": left, "center": left + (width - text_w) // 2, "right": left + width - text_w}[align]


def paper(size: tuple[int, int], colour: RGB, rng: random.Random, cfg: SynthConfig) -> Image.Image:
    """A paper-like background: the base colour, fine grain and soft low-frequency blotches."""
    w, h = size
    g = np.random.default_rng(rng.getrandbits(63))
    base = np.empty((h, w, 3), np.float32)
    base[:] = colour
    if rng.random() < 0.7:
        blotch = g.normal(0, 1, (max(2, h // 64), max(2, w // 64), 1)).astype(np.float32)
        blotch_img = Image.fromarray(((blotch[..., 0] + 3) * 40).clip(0, 255).astype(np.uint8))
        soft = np.asarray(blotch_img.resize((w, h), Image.BICUBIC), np.float32)[..., None] / 40 - 3
        base += soft * rng.uniform(1.0, 5.0)
    base += g.normal(0, cfg.grain * rng.random(), (h, w, 1)).astype(np.float32)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")


def canvas(content: tuple[int, int], style: Style, rng: random.Random, cfg: SynthConfig):
    """A paper canvas around content (w, h) with random margins, long side in [min_side, max_side]."""
    cw, ch = content
    mx = min(rng.randint(16, 48), (cfg.max_side - cw) // 2)
    my = min(rng.randint(16, 48), (cfg.max_side - ch) // 2)
    w, h = cw + 2 * mx, ch + 2 * my
    if max(w, h) < cfg.min_side:  # grow the margins of the long side (and some of the other) up to min_side
        target = rng.randint(cfg.min_side, max(cfg.min_side, min(cfg.max_side, int(cfg.min_side * 1.3))))
        scale = target / max(w, h)
        w, h = max(w, int(w * scale)), max(h, int(h * scale))
    img = paper((w, h), style.palette.paper, rng, cfg)
    return img, ImageDraw.Draw(img), ((w - cw) // 2, (h - ch) // 2)


def frame(page: Image.Image, rng: random.Random, cfg: SynthConfig) -> Image.Image:
    """With frame_prob, the page on a darker textured surface with a soft shadow, within max_side."""
    room = cfg.max_side - max(page.size)
    if rng.random() >= cfg.frame_prob or room < 16:
        return page
    pad = rng.randint(8, min(40, room // 2))
    w, h = page.width + 2 * pad, page.height + 2 * pad
    surface = tuple(rng.randint(40, 140) for _ in range(3))
    img = paper((w, h), surface, rng, cfg)
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).rectangle((pad + 3, pad + 4, pad + page.width + 3, pad + page.height + 4), fill=110)
    img.paste((0, 0, 0), (0, 0), shadow.filter(ImageFilter.GaussianBlur(4)))
    img.paste(page, (pad, pad))
    return img


def augment(img: Image.Image, rng: random.Random, cfg: SynthConfig) -> Image.Image:
    """Slight rotation and perspective, blur and noise, each drawn with its own strength (all may be zero)."""
    if rng.random() >= cfg.augment_prob:
        return img
    fill = img.getpixel((0, 0))  # corners uncovered by rotation take the border's colour (paper or surface)
    w, h = img.size
    if rng.random() < 0.5:
        img = img.rotate(rng.uniform(-cfg.max_rotate_deg, cfg.max_rotate_deg), Image.BICUBIC, fillcolor=fill)
    if rng.random() < 0.4:
        d = [rng.uniform(-cfg.max_perspective, cfg.max_perspective) * s for _ in range(4) for s in (w, h)]
        quad = (d[0], d[1], d[2], h + d[3], w + d[4], h + d[5], w + d[6], d[7])  # UL, LL, LR, UR source corners
        img = img.transform((w, h), Image.QUAD, quad, Image.BICUBIC, fillcolor=fill)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, cfg.max_blur)))
    if rng.random() < cfg.noise_prob:
        g = np.random.default_rng(rng.getrandbits(63))
        arr = np.asarray(img, np.float32) + g.normal(0, rng.uniform(1.0, cfg.max_noise), (h, w, 1))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return img


def encode(img: Image.Image, rng: random.Random, cfg: SynthConfig) -> tuple[bytes, str]:
    """PNG or (with jpeg_prob) JPEG bytes, with no metadata, so a seed reproduces every byte; returns (bytes, ext)."""
    buf = io.BytesIO()
    if rng.random() < cfg.jpeg_prob:
        img.save(buf, "JPEG", quality=rng.randint(*cfg.jpeg_quality))
        return buf.getvalue(), "jpg"
    img.save(buf, "PNG", compress_level=1)  # level 6 is 3x slower on noisy paper for ~5% smaller files
    return buf.getvalue(), "png"


# --- layout: families build drawing ops in content coordinates; render() fits them onto paper -------------------
# ops: ("text", x, y, text, font, fill) | ("line", xy, fill, width) | ("rect", box, fill, outline)
#      | ("pie", box, start_deg, end_deg, fill) | ("ellipse", box, fill) | ("polygon", points, fill)
def paint(draw: ImageDraw.ImageDraw, ops: list, offset: tuple[int, int]) -> None:
    ox, oy = offset
    for op in ops:
        kind = op[0]
        if kind == "text":
            draw.text((op[1] + ox, op[2] + oy), op[3], font=op[4], fill=op[5])
        elif kind == "line":
            draw.line([(x + ox, y + oy) for x, y in op[1]], fill=op[2], width=op[3])
        elif kind == "rect":
            x0, y0, x1, y1 = op[1]
            draw.rectangle((x0 + ox, y0 + oy, x1 + ox, y1 + oy), fill=op[2], outline=op[3])
        elif kind == "pie":
            x0, y0, x1, y1 = op[1]
            draw.pieslice((x0 + ox, y0 + oy, x1 + ox, y1 + oy), op[2], op[3], fill=op[4])
        elif kind == "ellipse":
            x0, y0, x1, y1 = op[1]
            draw.ellipse((x0 + ox, y0 + oy, x1 + ox, y1 + oy), fill=op[2])
        elif kind == "polygon":
            draw.polygon([(x + ox, y + oy) for x, y in op[1]], fill=op[2])


def render(layout, style: Style, rng: random.Random, cfg: SynthConfig) -> Image.Image:
    """layout(cap_px) -> (ops, (w, h)); text shrinks from style.cap_px to cfg.min_cap_px until it fits, else NoFit."""
    for cap in range(style.cap_px, cfg.min_cap_px - 1, -2):
        ops, (w, h) = layout(cap)
        if max(w, h) + 32 <= cfg.max_side:
            img, draw, offset = canvas((w, h), style, rng, cfg)
            paint(draw, ops, offset)
            return frame(img, rng, cfg)
    raise NoFit


@dataclass(frozen=True)
class QA:
    """One question about an image: the answer, accepted variants and a plausible wrong answer for DPO."""

    kind: str
    question: str
    answer: str
    answers: tuple[str, ...]
    rejected: str


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou8" else "a ") + phrase


def wrong(answer: str, candidates, fallback: str) -> str:
    """The first candidate that differs from answer, else fallback (which must differ too)."""
    for c in candidates:
        if c != answer:
            return c
    assert fallback != answer
    return fallback
