"""Robust image decoding: every file gets either correct RGB pixels or a machine-readable reason.

Rules (each covered by tests):
- Pillow's decompression-bomb guard stays on. Besides, an image whose header claims more than
  `max_pixels` is rejected as `decompression_bomb` from its header alone, before any pixel is
  decoded; a Pillow DecompressionBombWarning is turned into the same rejection (locally, with
  `warnings.catch_warnings`, never globally).
- Zero-byte files → `empty_file`; unidentifiable bytes → `not_an_image`; data that ends early →
  `truncated` (LOAD_TRUNCATED_IMAGES is never switched on); other decoder failures → `corrupt`.
  Below `min_side` px on a side → `too_small`.
- Modes: CMYK → RGB; 16-bit `I;16*` scaled by 1/257 (a plain convert clips to white); `I` and `F`
  rescaled by their range; palette with transparency, LA, PA and RGBA composited on a fixed
  background; animated images → first frame; 1-bit → L → RGB.
- EXIF orientation applied with `ImageOps.exif_transpose`; unreadable EXIF is ignored.

Memory bound: at most `max_pixels` pixels are ever decoded (4 bytes each plus one converted
copy: ~0.7 GB at Pillow's default of 89.5 MP), and probing a JPEG decodes it at 1/8 scale.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """A file that cannot become an RGB image; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 89_478_485  # Pillow's own default guard
    min_side: int = 8
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError("max_pixels and min_side must be >= 1")


@dataclass(frozen=True)
class ProbeResult:
    status: str
    error: str | None
    format: str | None
    width: int | None
    height: int | None
    mode: str | None


_TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise DecodeError("empty_file", "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "cannot identify image file (unknown or broken format)") from None
    except Exception as e:  # a header cut short is truncation; any other broken header is no image
        reason = "truncated" if "runcated" in str(e) else "not_an_image"
        raise DecodeError(reason, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise DecodeError(
            "decompression_bomb", f"header claims {w}x{h} = {w * h} pixels > limit {limits.max_pixels}"
        )
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # corrupt EXIF is ignored
        return 1


def _load(im: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError)) else "corrupt"
        raise DecodeError(reason, f"{type(e).__name__}: {msg}") from None
    except Exception as e:
        raise DecodeError("corrupt", f"{type(e).__name__}: {e}") from None


def probe(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ProbeResult:
    """Status, format and size (after EXIF orientation) of one file; never raises."""
    fmt = mode = None
    w = h = None
    try:
        im = _open(data, limits)
        fmt, mode = im.format, im.mode
        w, h = im.size
        if _orientation(im) in _TRANSPOSING:
            w, h = h, w
        if min(w, h) < limits.min_side:
            return ProbeResult("too_small", f"{w}x{h} is below {limits.min_side} px on a side", fmt, w, h, mode)
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        _load(im)
        return ProbeResult("ok", None, fmt, w, h, mode)
    except DecodeError as e:
        return ProbeResult(e.reason, str(e), fmt, w, h, mode)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.uint16)
        return Image.fromarray((arr.astype(np.float32) / 257.0 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 255.0) if mode == "I" and arr.min() >= 0 and arr.max() <= 255 else (
            (0.0, 65535.0) if mode == "I" and arr.min() >= 0 and arr.max() <= 65535 else
            (0.0, 1.0) if mode == "F" and arr.min() >= 0 and arr.max() <= 1 else (float(arr.min()), float(arr.max()))
        )
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        bg = Image.new("RGB", im.size, background)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB") if mode != "RGB" else im


def decode_rgb(data: bytes, limits: DecodeLimits = DecodeLimits(), target_side: int | None = None) -> Image.Image:
    """RGB pixels of one file, EXIF-transposed (first frame of an animation); raises DecodeError.

    With target_side, a JPEG is decoded at the smallest DCT scale whose sides stay >= target_side,
    and any other image is shrunk to at most 2 × target_side on its longer side.
    """
    im = _open(data, limits)
    if min(im.size) < limits.min_side:
        raise DecodeError("too_small", f"{im.size[0]}x{im.size[1]} is below {limits.min_side} px on a side")
    if getattr(im, "is_animated", False):
        im.seek(0)
    if target_side and im.format == "JPEG":
        im.draft("RGB", (target_side, target_side))
    _load(im)
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # corrupt EXIF: keep the pixels as stored
        pass
    rgb = _to_rgb(im, limits.background)
    if target_side and max(rgb.size) > 2 * target_side:
        rgb.thumbnail((2 * target_side, 2 * target_side), Image.Resampling.BILINEAR)
    return rgb
