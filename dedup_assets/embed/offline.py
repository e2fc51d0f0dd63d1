"""The offline embedder: a deterministic near-copy descriptor that needs no model weights.

It is the default of the demo and the tests, and a fair choice on machines without CLIP
weights. It is built for near-duplicates (the same picture after the edits web copies carry),
not for semantic similarity. The steps, and why:

1. Border trimming: uniform margins (padding, letterboxing, the fill of a rotation) are cut off
   on each side, so a padded copy is compared on its content.
2. Canonical mirror: the image is mirrored when its luminance mass lies right of centre (the sign
   of the first horizontal moment), so an image and its horizontal flip get the same descriptor,
   while a clock at 3:00 and one at 9:00 stay different (they are not mirror copies of each other
   once the canonical side is fixed by their whole content).
3. Several descriptors on the trimmed, canonical 64×64 luminance image, each normalized on its
   own so that an edit that corrupts one (a caption bar, a watermark, a crop) leaves the others:
   - blurred luminance layouts at 4×4, 8×8 and 16×16 (zero mean, unit norm: brightness and
     contrast changes cancel);
   - gradient-orientation histograms (8 unsigned bins) on a 4×4 grid and on a 2×2 grid shifted by
     half a cell (robust to JPEG noise, crops and small rotations);
   - a coarse colour layout (2×2 chroma means), weighted low so grayscale copies still match.
4. Power (signed square-root) normalization, concatenation with fixed weights, L2 normalization.

Dimension 512; `duplicate_threshold` is the cosine calibrated on the labelled near-copy set
(benchmarks/bench_offline_recall.py) for pair precision ≥ 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from dedup_assets.embed.base import l2_normalize

VERSION = "v1"
SIDE = 64
# Weights tuned on the labelled near-copy set (benchmarks/bench_offline_recall.py): the centre layout
# carries most, because crops, borders, caption bars and rotation corners leave it.
W_LAY16, W_LAY8, W_LAY4, W_CEN8, W_CEN4, W_H4, W_H2, W_COL = 0.315, 0.785, 0.228, 1.403, 0.164, 0.182, 0.391, 0.429
W_CEDGE = 1.0


@dataclass(frozen=True)
class OfflineEmbedderConfig:
    trim_tolerance: float = 3.0  # max std (0-255) of a row/column that counts as uniform margin
    max_trim: float = 0.45  # never trim more than this fraction per side

    def __post_init__(self) -> None:
        if not 0 < self.max_trim < 0.5:
            raise ValueError("max_trim must be in (0, 0.5)")


def _trim(gray: np.ndarray, rgb: np.ndarray, tol: float, max_trim: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut uniform margins: runs of rows/columns that barely vary and share the edge's level.

    Repeated until nothing changes, so a padded copy of an image that has a plain background of
    its own is cut down to the same content box as the original.
    """
    h0, w0 = gray.shape
    top = bottom = left = right = 0
    for _ in range(4):
        g = gray[top : h0 - bottom, left : w0 - right]
        h, w = g.shape
        if h < 16 or w < 16:
            break
        rs, cs = g.std(axis=1), g.std(axis=0)
        rm, cm = g.mean(axis=1), g.mean(axis=0)

        def run(std: np.ndarray, means: np.ndarray, limit: int) -> int:
            n = 0
            while n < limit and std[n] < tol and abs(means[n] - means[0]) < tol:
                n += 1
            return n

        t = run(rs, rm, max(0, int(h0 * max_trim) - top))
        b = run(rs[::-1], rm[::-1], max(0, int(h0 * max_trim) - bottom))
        l_ = run(cs, cm, max(0, int(w0 * max_trim) - left))
        r = run(cs[::-1], cm[::-1], max(0, int(w0 * max_trim) - right))
        if not (t or b or l_ or r):
            break
        top, bottom, left, right = top + t, bottom + b, left + l_, right + r
    if h0 - top - bottom < 8 or w0 - left - right < 8:
        return gray, rgb
    return gray[top : h0 - bottom, left : w0 - right], rgb[top : h0 - bottom, left : w0 - right]


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mode = "F"
    if a.ndim == 2:
        return np.asarray(Image.fromarray(a.astype(np.float32), mode).resize(size, Image.Resampling.BILINEAR))
    return np.stack([_resize(a[..., c], size) for c in range(a.shape[2])], -1)


def _box(a: np.ndarray, n: int) -> np.ndarray:
    """Area-averaged n×n version of a 2-D float image."""
    return np.asarray(Image.fromarray(a, "F").resize((n, n), Image.Resampling.BOX))


def _box_up(a: np.ndarray, n: int) -> np.ndarray:
    """A blurred copy of `a`: area-averaged to n×n, then bilinearly back to its size."""
    small = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F").resize((n, n), Image.Resampling.BOX)
    return np.asarray(small.resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))


def _block_mean(a: np.ndarray, n: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a[: h - h % n, : w - w % n].reshape(n, h // n, n, w // n, *a.shape[2:]).mean(axis=(1, 3))


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 1e-6 else v


def _orient_hist(mag: np.ndarray, ang_bin: np.ndarray, cells: int, offset: int = 0) -> np.ndarray:
    h, w = mag.shape
    if offset:
        mag, ang_bin = mag[offset : h - offset, offset : w - offset], ang_bin[offset : h - offset, offset : w - offset]
        h, w = mag.shape
    ch, cw = h // cells, w // cells
    mag = mag[: ch * cells, : cw * cells]
    ang_bin = ang_bin[: ch * cells, : cw * cells]
    cell_id = (np.arange(ch * cells)[:, None] // ch) * cells + (np.arange(cw * cells)[None, :] // cw)
    flat = (cell_id * 8 + ang_bin).ravel()
    hist = np.bincount(flat, weights=mag.ravel(), minlength=cells * cells * 8).reshape(cells * cells, 8)
    hist = np.sqrt(hist)
    norms = np.linalg.norm(hist, axis=1, keepdims=True)
    return (hist / np.maximum(norms, 1e-6)).ravel()


class OfflineEmbedder:
    """Weight-free near-copy embedder (see module docstring)."""

    decode_side = 128  # decoders may hand over images this small (JPEG draft mode)

    def __init__(self, config: OfflineEmbedderConfig | None = None) -> None:
        self.config = config or OfflineEmbedderConfig()

    @property
    def model_id(self) -> str:
        return f"dedup-assets/offline-{VERSION}"

    @property
    def dim(self) -> int:
        return 512

    @property
    def duplicate_threshold(self) -> float:
        return 0.93

    def prepare(self, image: Image.Image) -> np.ndarray:
        img = image.convert("RGB")
        if max(img.size) > 160:
            img = img.copy()
            img.thumbnail((160, 160), Image.Resampling.BILINEAR)
        rgb = np.asarray(img, dtype=np.float32)
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        gray, rgb = _trim(gray, rgb, self.config.trim_tolerance, self.config.max_trim)
        g = _resize(gray, (SIDE, SIDE))
        c = _resize(rgb, (16, 16))
        xs = np.linspace(-1, 1, SIDE, dtype=np.float32)
        if float(((g - g.mean()) * xs[None, :]).sum()) < 0:  # canonical mirror
            g = g[:, ::-1]
            c = c[:, ::-1]
        # blur before sampling the layouts: JPEG blocks and small shifts average out
        lay16 = _unit(_box(g, 10))
        lay8 = _unit(_box(g, 8))
        lay4 = _unit(_box(g, 4))
        # the centre (20-80 % on both axes) survives crops, caption bars, borders and rotation corners
        centre = np.ascontiguousarray(g[SIDE // 5 : SIDE - SIDE // 5, SIDE // 5 : SIDE - SIDE // 5])
        cen8 = _unit(_box(centre, 8))
        cen4 = _unit(_box(centre, 4))
        # edge energy of the centre: the fine structure (a clock's hands, a glyph) that layouts blur away
        edges = np.abs(centre - _box_up(centre, 8))
        cen_edges = _unit(_box(np.ascontiguousarray(edges), 8))
        gy, gx = np.gradient(g)
        mag = np.hypot(gx, gy)
        ang = np.mod(np.arctan2(gy, gx), np.pi)
        ang_bin = np.minimum((ang / np.pi * 8).astype(np.int64), 7)
        h4 = _orient_hist(mag, ang_bin, 4)
        h2 = _orient_hist(mag, ang_bin, 2, offset=SIDE // 8)
        chroma = _block_mean(c, 2).reshape(4, 3)
        chroma = chroma - chroma.mean(axis=1, keepdims=True)  # colour, not brightness
        col = chroma.ravel() / 64.0
        parts = [
            (lay16, W_LAY16),  # 100
            (lay8, W_LAY8),  # 64
            (lay4, W_LAY4),  # 16
            (cen8, W_CEN8),  # 64
            (cen4, W_CEN4),  # 16
            (cen_edges, W_CEDGE),  # 64
            (_unit(h4), W_H4),  # 128
            (_unit(h2), W_H2),  # 32
            (col, W_COL),  # 12
        ]
        v = np.concatenate([p * w for p, w in parts])
        out = np.zeros(self.dim, np.float32)
        out[: v.size] = v  # 496 used; the rest stays zero so the dimension is a round 512
        return out

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.stack(batch))

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
