"""Hostile files (what web crawls really contain) and writers of img2dataset-style shards.

Used by the tests, the demo dataset and the benchmarks. Deterministic.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims a huge size (the pixel data is never there)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@lru_cache(maxsize=1)
def real_bomb_png(side: int = 20_000) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels (~50 kB for 400 MP).

    Unlike `bomb_png` every byte of pixel data is there, so a decoder without a guard would
    really allocate and fill side*side pixels; the IDAT stream is compressed row by row so that
    making it never holds the raw image either.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0, then all-zero (black) bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 64x32 JPEG (left half red, right half blue) stored with an EXIF orientation tag."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def corrupt_exif_jpeg() -> bytes:
    """A valid JPEG whose APP1 EXIF segment holds garbage."""
    good = _save(_gradient(), "JPEG", quality=90)
    garbage = b"Exif\x00\x00" + b"\xff\x13garbage-not-tiff" * 4
    app1 = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    return good[:2] + app1 + good[2:]


def hostile_files() -> dict[str, bytes]:
    """name-with-extension → bytes of files a decoder meets in the wild."""
    grad = _gradient()
    jpeg = _save(grad, "JPEG", quality=90)
    i16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))  # mode I;16
    pal = Image.new("P", (40, 30))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))
    pal.info["transparency"] = 0
    la = Image.fromarray(np.stack([np.full((30, 40), 40, np.uint8), np.full((30, 40), 128, np.uint8)], -1), "LA")
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    one_bit = Image.fromarray((np.indices((30, 40)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    # 32-bit integer and float grayscale (scientific/TIFF exports): left half dark, right half bright.
    i32 = np.zeros((30, 40), np.int32)
    i32[:, 20:] = 60_000
    f32 = np.zeros((30, 40), np.float32)
    f32[:, 20:] = 1.0
    pa = Image.new("PA", (40, 30))
    pa.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pa.paste((1, 255), (0, 0, 20, 30))  # left: opaque blue
    pa.paste((0, 0), (20, 0, 40, 30))  # right: fully transparent red
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text_named.jpg": b"<html>not an image</html>\n" * 5,
        "bomb.png": bomb_png(),
        "cmyk.jpg": _save(grad.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _save(i16, "PNG"),
        "palette_transparent.png": _save(pal, "PNG", transparency=0),
        "gray_alpha.png": _save(la, "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "animated.gif": gif.getvalue(),
        "exif_rotated.jpg": exif_rotated_jpeg(6),
        "corrupt_exif.jpg": corrupt_exif_jpeg(),
        "tiny.png": _save(Image.new("RGB", (2, 2), (10, 20, 30)), "PNG"),
        "one_bit.bmp": _save(one_bit, "BMP"),
        "image.tiff": _save(grad, "TIFF"),
        "image.webp": _save(grad, "WEBP", quality=90),
        "gray32.tif": _save(Image.fromarray(i32, "I"), "TIFF"),
        "float32.tif": _save(Image.fromarray(f32, "F"), "TIFF"),
        "palette_alpha.tif": _save(pa, "TIFF"),
    }


def _key(name: str) -> str:
    return name.rsplit(".", 1)[0]


def write_folder_shard(
    dir: Path,
    files: dict[str, bytes],
    captions: dict[str, str] | None = None,
    metas: dict[str, dict] | None = None,
) -> Path:
    """A folder shard: `<name>` files plus `<key>.txt` / `<key>.json` sidecars (keys may hold `/`)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dir / name).parent.mkdir(parents=True, exist_ok=True)
        (dir / name).write_bytes(data)
    for key, cap in (captions or {}).items():
        (dir / f"{key}.txt").write_text(cap, encoding="utf-8")
    for key, meta in (metas or {}).items():
        (dir / f"{key}.json").write_text(json.dumps(meta), encoding="utf-8")
    return dir


def write_tar_shard(
    path: Path,
    files: dict[str, bytes],
    captions: dict[str, str] | None = None,
    metas: dict[str, dict] | None = None,
) -> Path:
    """A WebDataset tar: members grouped by key (image, then .txt, then .json), sorted by key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    captions, metas = dict(captions or {}), dict(metas or {})
    members: list[tuple[str, bytes]] = []
    for name in sorted(files, key=lambda n: (_key(n), n)):
        members.append((name, files[name]))
        k = _key(name)
        if k in captions:
            members.append((f"{k}.txt", captions.pop(k).encode("utf-8")))
        if k in metas:
            members.append((f"{k}.json", json.dumps(metas.pop(k)).encode("utf-8")))
    members += [(f"{k}.txt", c.encode("utf-8")) for k, c in captions.items()]
    members += [(f"{k}.json", json.dumps(m).encode("utf-8")) for k, m in metas.items()]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path
