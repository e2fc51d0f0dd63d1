"""Synthetic base images of four kinds: photo-like scenes, flat graphics, text, analog clocks.

Deterministic by seed. Used to build labelled near-copy sets (tests, benchmarks) and the demo
dataset. Near-but-different images come for free: clocks at other times, text with other words,
charts of the same style — the hard negatives a near-copy detector must not merge.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("photo", "graphic", "text", "clock")
WORDS = (
    "river mountain quiet garden silver window harbor market evening winter lantern meadow "
    "copper forest bridge candle violet marble thunder orchard canyon island pepper velvet "
    "falcon glacier compass saddle ember lagoon quartz willow tundra cobalt prairie"
).split()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def make_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A natural-looking scene: sky gradient, layered hills, blobs, texture and noise."""
    w, h = size
    top = rng.integers(60, 200, 3)
    bottom = rng.integers(100, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    sky = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t).repeat(w, 1)
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for layer in range(int(rng.integers(2, 5))):
        base = h * (0.35 + 0.15 * layer + rng.uniform(-0.05, 0.05))
        amp = h * rng.uniform(0.03, 0.15)
        freq = rng.uniform(1, 4)
        phase = rng.uniform(0, 2 * math.pi)
        pts = [(x, base - amp * math.sin(freq * 2 * math.pi * x / w + phase)) for x in range(0, w + 8, 8)]
        color = tuple(int(c) for c in rng.integers(20, 200, 3))
        d.polygon(pts + [(w, h), (0, h)], fill=color)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.12) * w
        d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.2), cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    arr = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    tex = np.sin(xx / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 9)) * rng.uniform(4, 14)
    arr += tex[..., None] + rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_graphic(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Flat vector-like art: icons of shapes, or a bar chart with axes."""
    w, h = size
    bg = tuple(int(c) for c in rng.integers(200, 256, 3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # bar chart
        n = int(rng.integers(4, 9))
        d.line([(30, h - 30), (w - 20, h - 30)], fill=(0, 0, 0), width=2)
        d.line([(30, 20), (30, h - 30)], fill=(0, 0, 0), width=2)
        bw = (w - 60) / n
        color = tuple(int(c) for c in rng.integers(0, 180, 3))
        for i in range(n):
            bh = rng.uniform(0.1, 0.9) * (h - 60)
            d.rectangle([35 + i * bw, h - 30 - bh, 35 + (i + 0.7) * bw, h - 31], fill=color)
    else:  # icon-like shapes
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            x1, y1 = x0 + rng.uniform(20, w * 0.4), y0 + rng.uniform(20, h * 0.4)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = rng.integers(0, 3)
            if shape == 0:
                d.rectangle([x0, y0, x1, y1], fill=color)
            elif shape == 1:
                d.ellipse([x0, y0, x1, y1], fill=color)
            else:
                d.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=color)
    return img


def make_text(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A page of rendered words (different words make a near-but-different image)."""
    w, h = size
    bg = tuple(int(c) for c in rng.integers(215, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 90, 3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    fs = int(rng.integers(18, 34))
    font = _font(fs)
    y = int(rng.integers(8, 30))
    while y < h - fs:
        line = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        d.text((int(rng.integers(8, 40)), y), line, fill=fg, font=font)
        y += int(fs * rng.uniform(1.2, 1.8))
    return img


def make_clock(hour: int, minute: int, size: int = 256, style: int = 0) -> Image.Image:
    """An analog clock face showing hour:minute."""
    styles = [((255, 255, 255), (0, 0, 0), (240, 240, 240)), ((250, 240, 210), (60, 30, 10), (200, 220, 255)),
              ((30, 30, 40), (240, 240, 240), (90, 90, 110)), ((220, 250, 220), (0, 80, 0), (255, 255, 255))]
    face, ink, bg = styles[style % len(styles)]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c, r = size / 2, size * 0.42
    d.ellipse([c - r, c - r, c + r, c + r], fill=face, outline=ink, width=max(2, size // 64))
    for i in range(12):
        a = i * math.pi / 6
        d.line([(c + 0.85 * r * math.sin(a), c - 0.85 * r * math.cos(a)),
                (c + 0.97 * r * math.sin(a), c - 0.97 * r * math.cos(a))], fill=ink, width=max(2, size // 80))
    ha = (hour % 12 + minute / 60) * math.pi / 6
    ma = minute * math.pi / 30
    d.line([(c, c), (c + 0.5 * r * math.sin(ha), c - 0.5 * r * math.cos(ha))], fill=ink, width=max(3, size // 40))
    d.line([(c, c), (c + 0.8 * r * math.sin(ma), c - 0.8 * r * math.cos(ma))], fill=ink, width=max(2, size // 64))
    return img


def make_base_images(n: int, seed: int = 0, size: tuple[int, int] = (320, 256)) -> list[tuple[str, Image.Image]]:
    """n (kind, image) pairs cycling through the four kinds; deterministic by seed."""
    rng = np.random.default_rng(seed)
    # Clocks: distinct (style, time) combinations on a 20-minute grid, so two bases never show
    # (almost) the same face — a clock 2 minutes later is a copy in all but name — and only times
    # from 12:20 to 5:40, because the mirror image of 2:00 is 10:00: a horizontally flipped copy.
    clock_faces = np.random.default_rng(seed + 7).permutation(4 * 17)
    out: list[tuple[str, Image.Image]] = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "photo":
            img = make_photo(rng, size)
        elif kind == "graphic":
            img = make_graphic(rng, size)
        elif kind == "text":
            img = make_text(rng, size)
        else:
            face = int(clock_faces[(i // len(KINDS)) % clock_faces.size])
            style, slot = divmod(face, 17)
            slot += 1  # 0 would be 12:00, its own mirror image
            img = make_clock(slot // 3, (slot % 3) * 20, size=min(size), style=style)
        out.append((kind, img))
    return out
