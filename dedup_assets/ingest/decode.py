"""Robust image decoding: every file gets either correct RGB pixels or a machine-readable reason.

Grain: one encoded file (bytes) in, one `ProbeResult` or one RGB image out. No Dagster here.

Reasons (`DecodeError.reason`, `ProbeResult.status`):
`empty_file` (0 bytes) · `not_an_image` (no image signature: text, HTML, ...) · `unsupported`
(an image format or mode not decoded here: HEIF, SVG, PDF/PostScript, PSD, odd modes) ·
`truncated` (the data ends early) · `corrupt` (a known format whose data is broken) ·
`decompression_bomb` (the header claims more than `max_pixels`) · `too_small` (a side below
`min_side`) · `too_large` (the decoder ran out of memory).

Rules (each covered by tests):
- Pillow's decompression-bomb guard stays on (`Image.MAX_IMAGE_PIXELS` is never touched), and an
  image whose header claims more than `max_pixels` is rejected as `decompression_bomb` from its
  header alone, before any pixel is decoded. Pillow's own DecompressionBombWarning is turned
  into the same rejection inside a local `warnings.catch_warnings()` (never a global filter), so
  the effective limit is min(max_pixels, Image.MAX_IMAGE_PIXELS); its DecompressionBombError too.
- Truncation is never papered over (`ImageFile.LOAD_TRUNCATED_IMAGES` stays False); besides
  Pillow's errors, a PNG without its IEND chunk or a GIF without its trailer is `truncated` even
  when the first frame decoded, and a failure on data that is visibly cut short (by the format's
  own end marker or declared size) is `truncated` rather than `corrupt`. `probe` never raises.
- Only raster formats are opened (JPEG/MPO, PNG/APNG, GIF, WebP, BMP, TIFF, AVIF where Pillow
  has it): nothing ever starts a helper program (Pillow's EPS plugin would run Ghostscript).
- Modes: CMYK → RGB; 16-bit `I;16*` → 8 bit by v/257 (a plain convert clips); `I` and `F` are
  rescaled: values within 0..255 (I) or 0..1 (F) as they are, `I` within 0..65535 as 16 bit,
  anything else by its own min..max (NaN → min); palette/L/RGB with a transparency entry, LA,
  PA, RGBA are composited on the fixed `background`; 1-bit → black/white; animated images → the
  first frame (what Pillow opens at).
- EXIF orientation (2..8) applied with `ImageOps.exif_transpose`; EXIF that cannot be read is
  ignored (the pixels are kept as stored), never fatal.

Memory bound: at most min(max_pixels, Image.MAX_IMAGE_PIXELS) pixels of one image are ever
decoded, at most 4 bytes each (RGBA, CMYK, I, F): about 358 MB at the default 89.5 MP, plus the
file's bytes. `probe` decodes a JPEG at 1/8 scale (1/64 of the pixels; libjpeg still reads every
coefficient, so truncation is caught, and a progressive JPEG makes it hold ~2 bytes per sample
of coefficients). `decode_rgb` adds the RGB copy (3 bytes per pixel) and, for I/F images, 1 MP
blocks of float32 scratch; with `target_side` a JPEG is decoded at a reduced DCT scale first.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

_JPEG_FORMATS = ("JPEG", "MPO")


class DecodeError(Exception):
    """A file that cannot become an RGB image; `reason` is machine-readable (module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep `reason` when raised in a worker process
        return (DecodeError, (self.reason, str(self)))


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts; the defaults suit web-crawled training images."""

    max_pixels: int = 89_478_485  # Pillow's default guard; never disable the guard itself
    min_side: int = 8  # below this → "too_small" (tracking pixels, spacers)
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(
                f"DecodeLimits.max_pixels={self.max_pixels!r}: give a positive pixel count "
                "(default 89_478_485, Pillow's own guard)"
            )
        if not isinstance(self.min_side, int) or self.min_side < 1:
            raise ValueError(f"DecodeLimits.min_side={self.min_side!r}: give a side length >= 1 px (default 8)")
        bg = tuple(self.background)
        if len(bg) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in bg):
            raise ValueError(
                f"DecodeLimits.background={self.background!r}: give an RGB triple of ints in 0..255, "
                "e.g. (255, 255, 255)"
            )
        object.__setattr__(self, "background", bg)


@dataclass(frozen=True)
class ProbeResult:
    """What `probe` learned of one file; status is "ok" or a reason."""

    status: str
    error: str | None
    format: str | None  # Pillow's format name, e.g. "JPEG"
    width: int | None  # after EXIF orientation
    height: int | None
    mode: str | None  # the mode as stored, e.g. "CMYK", "I;16", "P", "LA"


# ------------------------------------------------------------------------ signatures and ends
def _be32(data: bytes, pos: int) -> int:
    return struct.unpack_from(">I", data, pos)[0]


def _le32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _signature(data: bytes) -> str | None:
    """The raster format the bytes claim to be, from their magic number alone."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and data[6:10] == b"\0\0\0\0":  # the reserved fields are zero
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _unsupported_kind(data: bytes) -> str | None:
    """A name for image-like content that is deliberately not decoded here."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF/HEIC"
    head = data[:1024].lstrip()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG (vector)"
    if data.startswith(b"%PDF"):
        return "PDF"
    if data.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "PostScript/EPS"
    if data.startswith(b"8BPS"):
        return "Photoshop PSD"
    if data.startswith((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")):
        return "JPEG 2000"
    return None


def _cut_short(data: bytes, fmt: str | None) -> bool:
    """Whether the bytes visibly end before the format's end marker or declared size."""
    try:
        if fmt == "PNG":
            pos, n = 8, len(data)
            while pos + 8 <= n:
                end = pos + 12 + _be32(data, pos)
                if end > n:
                    return True
                if data[pos + 4 : pos + 8] == b"IEND":
                    return False
                pos = end
            return True
        if fmt == "JPEG":
            return data.rfind(b"\xff\xd9") < 0
        if fmt == "GIF":
            return not data.rstrip(b"\x00").endswith(b";")
        if fmt == "WEBP":
            return len(data) < 8 + _le32(data, 4)
        if fmt == "BMP":
            declared = _le32(data, 2)
            return declared > len(data) or _le32(data, 10) >= len(data)
        if fmt == "TIFF":
            order = "<" if data.startswith(b"II") else ">"
            return struct.unpack_from(order + "I", data, 4)[0] + 2 > len(data)
    except struct.error:  # not even the header is there
        return True
    return False


# Formats Image.open may try: raster decoders only (see module docstring).
Image.init()
_ALLOWED_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

_TRUNCATION_WORDS = ("truncat", "unexpected end", "end of file", "premature end", "not enough data")
_UNSUPPORTED_WORDS = (
    "not supported", "unsupported", "not available", "not implemented", "unknown raw mode", "cannot convert",
)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _failure(data: bytes, exc: BaseException) -> DecodeError:
    """The reason for a decoder exception on these bytes."""
    # Drop object addresses ("<_io.BytesIO object at 0x...>"): the same file must give the same text.
    msg = _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, MemoryError):
        return DecodeError("too_large", f"not enough memory to decode: {msg}")
    fmt = _signature(data)
    low = str(exc).lower()
    if fmt is None:
        kind = _unsupported_kind(data)
        if kind:
            return DecodeError("unsupported", f"{kind} is not decoded here")
        return DecodeError("not_an_image", "no known image signature; Pillow cannot identify it either")
    if fmt not in _ALLOWED_FORMATS:  # e.g. AVIF with a Pillow built without it
        return DecodeError("unsupported", f"{fmt} is not decodable by this Pillow build")
    if _cut_short(data, fmt) or isinstance(exc, EOFError) or any(w in low for w in _TRUNCATION_WORDS):
        return DecodeError("truncated", f"{fmt} data ends early: {msg}")
    if any(w in low for w in _UNSUPPORTED_WORDS):
        return DecodeError("unsupported", f"{fmt} variant not decodable here: {msg}")
    return DecodeError("corrupt", f"{fmt} data is broken: {msg}")


def _quiet_but_bombs() -> None:
    """Inside catch_warnings(): a bomb warning becomes an exception; the decoders' chatter about
    hostile files (bad TIFF tags, odd EXIF) is dropped instead of flooding the logs."""
    warnings.simplefilter("ignore")
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _bomb(exc: BaseException) -> DecodeError:
    return DecodeError("decompression_bomb", f"Pillow's decompression-bomb guard: {exc}")


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Image.open plus the header checks; no pixel is decoded yet."""
    if not data:
        raise DecodeError("empty_file", "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            _quiet_but_bombs()
            im = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e) from None
    except Exception as e:  # UnidentifiedImageError, or a plugin choking on a broken header
        raise _failure(data, e) from None
    w, h = im.size
    if w * h > limits.max_pixels:
        im.close()
        raise DecodeError(
            "decompression_bomb",
            f"header claims {w}x{h} = {w * h} pixels > max_pixels {limits.max_pixels}; not decoded",
        )
    return im


def _load(im: Image.Image, data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            _quiet_but_bombs()
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e) from None
    except Exception as e:
        raise _failure(data, e) from None
    # Lenient decoders stop once the first frame is complete; a missing end still means the
    # download was cut (see module docstring).
    fmt = _signature(data)
    if fmt in ("PNG", "GIF") and _cut_short(data, fmt):
        raise DecodeError("truncated", f"{fmt} file ends before its end marker")


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation 1..8; 1 when absent, invalid or unreadable (corrupt EXIF is ignored)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF; we ignore it anyway
            value = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


def _oriented(im: Image.Image) -> Image.Image:
    orientation = _orientation(im)
    if orientation == 1:
        return im  # no copy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ImageOps.exif_transpose(im)
        return out if out is not None else im
    except Exception:  # rewriting the rest of a damaged EXIF block failed; the tag was readable
        return im.transpose(_TRANSPOSE[orientation])


@lru_cache(maxsize=1)
def _u16_to_u8() -> np.ndarray:
    v = np.arange(65536, dtype=np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)


def _rescale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 of (arr - lo) / (hi - lo) * 255, rounded and clipped, in ~1 MP blocks of float32."""
    out = np.empty(arr.shape, np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    step = max(1, (1 << 20) // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], step):
        block = np.nan_to_num(arr[r : r + step].astype(np.float32), nan=lo, posinf=hi, neginf=lo)
        block -= lo
        block *= scale
        block += 0.5
        np.clip(block, 0, 255, out=block)
        out[r : r + step] = block.astype(np.uint8)
    return out


def _gray_to_u8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    arr = np.asarray(im)
    if mode.startswith("I;16"):
        return _u16_to_u8()[arr.astype(np.uint16, copy=False)]
    finite = arr[np.isfinite(arr)] if mode == "F" else arr
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if mode == "I" and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return _u16_to_u8()[arr.astype(np.uint16)]
    if mode == "F" and lo >= 0 and hi <= 1:
        return _rescale(arr, 0.0, 1.0)
    return _rescale(arr, lo, hi)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB pixels of a loaded image of any mode (module docstring)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_u8(im), "L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode in ("LA", "PA", "RGBa"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        out = Image.new("RGB", im.size, background)
        out.paste(im, mask=im.getchannel("A"))
        return out
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, L, P, 1


def probe(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ProbeResult:
    """Status, format, size after EXIF orientation and stored mode of one file; never raises.

    The file is decoded in full to catch truncation (a JPEG at 1/8 scale: see the memory bound).
    """
    fmt = mode = w = h = None
    im = None
    try:
        im = _open(data, limits)
        fmt, mode = im.format, im.mode
        w, h = im.size
        if min(w, h) < limits.min_side:
            return ProbeResult("too_small", f"{w}x{h} is below {limits.min_side} px on a side", fmt, w, h, mode)
        if fmt in _JPEG_FORMATS:
            im.draft(None, (1, 1))  # the smallest DCT scale (1/8) that still reads all the data
        # Load before reading EXIF: PNG's getexif() loads the image itself, and an error there
        # would be swallowed with the EXIF.
        _load(im, data)
        if _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        return ProbeResult("ok", None, fmt, w, h, mode)
    except DecodeError as e:
        return ProbeResult(e.reason, str(e), fmt, w, h, mode)
    except Exception as e:  # a decoder failing in a way nobody foresaw: still a row, not a crash
        err = _failure(data, e)
        return ProbeResult(err.reason, str(err), fmt, w, h, mode)
    finally:
        if im is not None:
            im.close()


def decode_rgb(data: bytes, limits: DecodeLimits = DecodeLimits(), target_side: int | None = None) -> Image.Image:
    """RGB pixels of one file, EXIF-transposed, first frame of an animation; raises DecodeError.

    With `target_side` (for embedders and thumbnails): a JPEG is decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) whose shorter side is still >= target_side; any other image whose
    shorter side exceeds 2 × target_side is shrunk with `thumbnail()` until its shorter side is
    about 2 × target_side. So the shorter side ends in [target_side, ~2 × target_side] unless
    the image was smaller to begin with; the aspect ratio is kept.
    """
    if target_side is not None and target_side < 1:
        raise ValueError(f"target_side={target_side}: give a side length >= 1 px, or None for full size")
    im = _open(data, limits)
    rgb = None
    try:
        if min(im.size) < limits.min_side:
            raise DecodeError("too_small", f"{im.size[0]}x{im.size[1]} is below {limits.min_side} px on a side")
        is_jpeg = im.format in _JPEG_FORMATS
        if target_side and is_jpeg:
            im.draft("RGB", (target_side, target_side))
        _load(im, data)
        try:
            rgb = _to_rgb(_oriented(im), limits.background)
        except MemoryError as e:
            raise DecodeError("too_large", f"not enough memory to convert: {e}") from None
        except Exception as e:
            raise DecodeError("unsupported", f"cannot convert mode {im.mode} to RGB: {type(e).__name__}: {e}") from None
        if target_side and not is_jpeg and min(rgb.size) > 2 * target_side:
            factor = 2 * target_side / min(rgb.size)
            rgb.thumbnail((max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))))
        return rgb
    except DecodeError:
        raise
    except Exception as e:  # never let a decoder's own exception type escape
        raise _failure(data, e) from None
    finally:
        if rgb is not im:  # an RGB file comes back as the opened image itself: keep it usable
            im.close()
