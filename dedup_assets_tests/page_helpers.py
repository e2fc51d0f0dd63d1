"""Helpers shared by the tests of the two review pages."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

EVIL = "<script>alert('x')</script>"


def make_image(seed: int, size: tuple[int, int] = (200, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def image_files(root: Path, n: int) -> dict[str, str]:
    """n training images on disk; image_id → location (a plain path)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"t{i}.jpg"
        make_image(i).save(p, "JPEG")
        out[f"s0/t{i}"] = str(p)
    return out


def decode_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def data_uris(page: str) -> list[str]:
    return re.findall(r"src=\"(data:image/jpeg;base64,[A-Za-z0-9+/=]+)\"", page)
