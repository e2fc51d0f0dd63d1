"""Transformations that real web copies of an image carry, each randomized by a Generator.

Names (keys of TRANSFORMS): resize (0.3×–2×), jpeg (quality 20–95), png (PNG round trip of a
JPEG-degraded image), crop (up to 15 % per side), flip (horizontal), rotate (up to 10°, filled),
color (brightness/contrast/saturation jitter), grayscale, border (solid padding, asymmetric),
caption_bar (a text strip over up to 20 % of the height), watermark (semi-transparent text).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from dedup_assets.synth.bases import WORDS, _font


def _resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = float(rng.uniform(0.3, 2.0))
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(20, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _png(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    _jpeg(img, rng).save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    l, r = rng.uniform(0, 0.15, 2) * w
    t, b = rng.uniform(0, 0.15, 2) * h
    return img.crop((round(l), round(t), round(w - r), round(h - b)))


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(img)


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(2, 10)) * (1 if rng.random() < 0.5 else -1)
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=bool(rng.random() < 0.5), fillcolor=fill)


def _color(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Color(img).enhance(float(rng.uniform(0.5, 1.5)))


def _grayscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.convert("L").convert("RGB")


def _border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    pads = [int(p) for p in rng.uniform(0.02, 0.15, 4) * np.array([w, h, w, h])]
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(img, border=tuple(pads), fill=color)


def _caption_bar(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = img.copy()
    w, h = img.size
    bh = int(h * rng.uniform(0.08, 0.2))
    y0 = 0 if rng.random() < 0.5 else h - bh
    d = ImageDraw.Draw(img)
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    d.rectangle([0, y0, w, y0 + bh], fill=bg)
    fg = tuple(255 - c for c in bg)
    d.text((8, y0 + bh // 4), " ".join(rng.choice(WORDS, 3)), fill=fg, font=_font(max(10, bh // 2)))
    return img


def _watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    w, h = base.size
    fs = max(12, int(h * rng.uniform(0.08, 0.16)))
    x, y = int(rng.uniform(0, w * 0.5)), int(rng.uniform(0, h * 0.8))
    d.text((x, y), str(rng.choice(["© stock", "SAMPLE", "photo.co", "preview"])), fill=(255, 255, 255, int(rng.integers(90, 170))), font=_font(fs))
    return Image.alpha_composite(base, layer).convert("RGB")


TRANSFORMS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "resize": _resize,
    "jpeg": _jpeg,
    "png": _png,
    "crop": _crop,
    "flip": _flip,
    "rotate": _rotate,
    "color": _color,
    "grayscale": _grayscale,
    "border": _border,
    "caption_bar": _caption_bar,
    "watermark": _watermark,
}


def random_copy(img: Image.Image, rng: np.random.Generator, n_ops: int) -> tuple[Image.Image, list[str]]:
    """A near-copy made by n_ops distinct random transformations; returns (image, op names)."""
    names = list(rng.choice(list(TRANSFORMS), size=min(n_ops, len(TRANSFORMS)), replace=False))
    out = img
    for name in names:
        out = TRANSFORMS[name](out, rng)
    return out.convert("RGB"), [str(n) for n in names]
