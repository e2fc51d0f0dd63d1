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


# Clock designs differ in geometry, not only in colour: a recoloured or grayscale copy of a clock
# is a near-copy, so two bases at the same time must differ in shape to be different images.
# (face colour, ink colour, background, face shape, tick kind, hand width scale)
CLOCK_STYLES = (
    ((255, 255, 255), (0, 0, 0), (240, 240, 240), "round", "ticks12", 1.0),
    ((250, 240, 210), (60, 30, 10), (200, 220, 255), "round", "ticks4", 1.3),
    ((30, 30, 40), (240, 240, 240), (90, 90, 110), "round", "dots12", 1.0),
    ((220, 250, 220), (0, 80, 0), (255, 255, 255), "square", "ticks12", 1.0),
    ((255, 255, 255), (20, 40, 140), (250, 250, 250), "round", "ticks60", 0.6),
    ((240, 220, 230), (90, 0, 40), (60, 60, 60), "octagon", "ticks12", 1.6),
)
# Clock bases show times on a 5-minute grid strictly between 12:00 and 6:00: the mirror image of
# t minutes past twelve is 720 - t (2:00 <-> 10:00), so no base is a horizontally flipped copy of
# another. Each time is used once before any repeats, and a repeat uses the design three styles
# away (round vs square, thin vs four-tick, dots vs octagon): two clocks of one design differ by at
# least a 30-degree turn of the minute hand, and two clocks at one time differ in design. (Past
# 142 clocks, i.e. 568 bases, later repeats use the remaining designs; no face repeats exactly
# before 426 clocks.)
CLOCK_SLOTS = 71


def make_clock(hour: int, minute: int, size: int = 256, style: int = 0) -> Image.Image:
    """An analog clock face showing hour:minute; style (0-5) picks the design."""
    face, ink, bg, shape, ticks, hand = CLOCK_STYLES[style % len(CLOCK_STYLES)]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c, r = size / 2, size * 0.42
    outline = max(2, size // 64)
    if shape == "round":
        d.ellipse([c - r, c - r, c + r, c + r], fill=face, outline=ink, width=outline)
    elif shape == "square":
        d.rounded_rectangle([c - r, c - r, c + r, c + r], radius=r * 0.25, fill=face, outline=ink, width=outline)
    else:
        pts = [(c + r * math.cos(math.pi / 8 + k * math.pi / 4), c + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
        d.polygon(pts, fill=face, outline=ink, width=outline)
    marks = {"ticks12": 12, "ticks4": 4, "dots12": 12, "ticks60": 60}[ticks]
    for i in range(marks):
        a = i * 2 * math.pi / marks
        s, co = math.sin(a), -math.cos(a)
        if ticks == "dots12":
            rd = size / 70
            d.ellipse([c + 0.88 * r * s - rd, c + 0.88 * r * co - rd, c + 0.88 * r * s + rd, c + 0.88 * r * co + rd], fill=ink)
            continue
        inner = 0.75 if ticks == "ticks4" else (0.85 if ticks == "ticks12" or i % 5 == 0 else 0.92)
        width = max(2, size // 80) * (2 if ticks == "ticks4" else 1)
        d.line([(c + inner * r * s, c + inner * r * co), (c + 0.97 * r * s, c + 0.97 * r * co)], fill=ink, width=width)
    ha = (hour % 12 + minute / 60) * math.pi / 6
    ma = minute * math.pi / 30
    d.line([(c, c), (c + 0.5 * r * math.sin(ha), c - 0.5 * r * math.cos(ha))], fill=ink,
           width=max(3, round(size / 40 * hand)))
    d.line([(c, c), (c + 0.8 * r * math.sin(ma), c - 0.8 * r * math.cos(ma))], fill=ink,
           width=max(2, round(size / 64 * hand)))
    return img


def make_base_images(n: int, seed: int = 0, size: tuple[int, int] = (320, 256)) -> list[tuple[str, Image.Image]]:
    """n (kind, image) pairs cycling through the four kinds; deterministic by seed.

    Grain: one base image per row. Near-but-different pairs arise by construction: clocks of one
    design at other times, text pages with other words, bar charts of one layout.
    """
    rng = np.random.default_rng(seed)
    crng = np.random.default_rng(seed + 7)
    clock_slots = crng.permutation(CLOCK_SLOTS)
    clock_styles = crng.integers(0, len(CLOCK_STYLES), CLOCK_SLOTS)
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
            k = i // len(KINDS)
            slot = int(clock_slots[k % CLOCK_SLOTS])
            style = (int(clock_styles[slot]) + (0, 3, 1, 4, 2, 5)[(k // CLOCK_SLOTS) % 6]) % len(CLOCK_STYLES)
            minutes = 5 * (slot + 1)  # 0 would be 12:00, its own mirror image
            img = make_clock(minutes // 60, minutes % 60, size=min(size), style=style)
        out.append((kind, img))
    return out
