"""The offline embedder: a deterministic near-copy descriptor that needs no model weights.

Grain: one 512-d unit vector per image. It is the default of the demo and the tests, and a fair
choice on machines without CLIP weights. It is built for near-duplicates (the same picture after
the edits web copies carry), not for semantic similarity.

Steps, and why:

1. Work on a ≤160-px thumbnail (decoders may hand over a JPEG decoded at 1/2–1/8 scale).
2. Normalize the frame, so that edits that only add or remove "frame" do not reach the features:
   - caption strip removal: a solid strip at the top or bottom edge that contains text and ends
     sharply is cut off (a caption bar becomes a mild crop);
   - rotation-fill repair: when all corners share one fill colour reaching in along rows and the
     image behind it has a plain background, fill, blended edge and background are painted with
     that background (a rotated graphic becomes a rotated graphic on its own background);
   - border trimming: uniform margins of any colour are cut, repeatedly, so a padded copy and an
     image with a plain background of its own end up on the same content box.
3. Several descriptors, each unit-normalized on its own (so one corrupted by a crop or a watermark
   leaves the others), all invariant to a horizontal flip by construction:
   - luminance layouts (3×3, 6×6) symmetrized with their mirror image;
   - gradient-orientation histograms (whole image, 3×3 grid, centre 2×2) with soft orientation
     bins, mirrored bins pooled, square-rooted (robust to JPEG, small shifts and rotations);
   - a contrast-normalized luminance histogram;
   - a small colour part (chroma layouts at 2×2 and 4×4 plus a constant "no colour" component,
     so grayscale copies lose only this part and gray images do not amplify JPEG chroma noise);
   - polar descriptors around the centre in aspect-preserving coordinates (rings × angular
     sectors of luminance and edge energy; radial structure such as clock hands, and tolerant of
     small rotations), folded left/right;
   - second-order polar terms: products of the left-minus-right (antisymmetric) parts, which are
     flip-invariant yet keep which features lie on the same side (1:10 vs 1:50 on a clock), the
     information that folding alone loses.
4. Weighted concatenation (a part's weight w makes its cosine count w / Σw in the total cosine),
   zero-padded to 512 dimensions, L2 normalization.

The part weights were fitted on a labelled near-copy set (synth seed 1, 300 bases × 4 copies) by
maximizing pair recall at a fixed number of false pairs; `duplicate_threshold` was then calibrated
on a disjoint set (seed 2, 400 bases × 4 copies) for pair precision ≥ 0.95. See
benchmarks/bench_offline_recall.py for the measured precision/recall (seed 4, 400 bases × 4
copies: precision 0.96 / recall 0.67 at the threshold, best recall 0.70 at precision ≥ 0.95,
vs 0.30 for a 32×32 thumbnail; crops, rotations and caption bars remain the weak spots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from dedup_assets.embed.base import l2_normalize

VERSION = "v2"
DIM = 512
SIDE = 64  # square working image for layouts and orientation histograms
THUMB = 160  # longest side the frame normalization works on
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# Weights of the parts (see the module docstring for how they were obtained).
WEIGHTS: dict[str, float] = {
    "lay3": 0.021,
    "lay6": 0.035,
    "hog1": 0.100,
    "hog3": 0.103,
    "c60hog2": 0.144,
    "col2": 0.050,
    "col4": 0.054,
    "lumhist": 0.046,
    "hub8_edge": 0.050,
    "hub8_lum": 0.032,
    "anti8_prod": 0.111,
    "anti8_sym": 0.075,
    "anti6_prod": 0.150,
}
# Cosine at/above which two images are near-copies: pair precision ≥ 0.95 on the calibration set.
DUPLICATE_THRESHOLD = 0.89


@dataclass(frozen=True)
class OfflineEmbedderConfig:
    """Knobs of the frame normalization (the defaults are the calibrated ones)."""

    trim_tolerance: float = 12.0  # 0-255 levels a margin pixel may differ from the margin colour
    max_trim: float = 0.45  # never trim more than this fraction of a side
    remove_caption_strips: bool = True
    repair_rotation_fill: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.max_trim < 0.5:
            raise ValueError(f"max_trim must be in (0, 0.5), got {self.max_trim}; set e.g. 0.45")
        if not 0 < self.trim_tolerance <= 64:
            raise ValueError(f"trim_tolerance must be in (0, 64], got {self.trim_tolerance}; set e.g. 12")


# ---------------------------------------------------------------------------------------------
# small helpers


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F")


def _box(a: np.ndarray, n: int, m: int | None = None) -> np.ndarray:
    """Area-averaged n×m (width×height) version of a 2-D float image."""
    return np.asarray(_img(a).resize((n, m or n), Image.Resampling.BOX))


def _unit(v: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm (a constant vector stays zero)."""
    v = np.asarray(v, np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else v


def _unit_nc(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else v


def _sym(grid: np.ndarray) -> np.ndarray:
    """Pool a grid with its mirror image; keep the left half (the right half repeats it)."""
    s = grid + grid[:, ::-1]
    return s[:, : (grid.shape[1] + 1) // 2]


# ---------------------------------------------------------------------------------------------
# frame normalization


def _caption_cut(rgb: np.ndarray, tol: float = 14.0, max_frac: float = 0.25) -> tuple[int, int]:
    """Rows to cut at the top and bottom: a solid strip with text in it that ends sharply.

    A strip with no text is left alone (it is a margin, which trimming handles); the sharp end
    (clean strip rows, then mostly non-strip colours within three rows) keeps sky gradients and
    text pages from being mistaken for a strip.
    """
    h = rgb.shape[0]
    lim = int(h * max_frac)
    out = []
    for lines in (rgb[: lim + 4], rgb[::-1][: lim + 4]):
        ref = np.median(lines[0], axis=0)
        frac = (np.abs(lines - ref).max(axis=2) <= tol).mean(axis=1)
        cut = 0
        lo, hi = max(3, int(0.04 * h)), min(lim, len(frac) - 3)
        if frac[0] >= 0.97 and hi >= lo:
            e = np.arange(lo, hi + 1)
            stop = np.flatnonzero(frac[e - 1] < 0.2)  # a content row before any strip end
            end = np.flatnonzero((frac[e - 1] >= 0.85) & (frac[e + 2] <= 0.3))
            if end.size and (not stop.size or end[0] < stop[0]):
                k = int(e[end[0]])
                if frac[:k].min() < 0.8:
                    cut = k + 2  # two more rows: the blend of strip and content
        out.append(cut)
    return out[0], out[1]


def _repair_rotation_fill(rgb: np.ndarray, tol: float = 12.0) -> np.ndarray:
    """Paint the fill of a rotation with the plain background it replaced (else: unchanged).

    Applies when ≥3 corners share one colour, runs of it reach in along rows, and just inside
    them (and 8 px further in, so not an outline) lies one other colour. The fill, the blended
    edge and the background they touch (colours between the two, reached along rows) are painted
    with that background.
    """
    h, w, _ = rgb.shape
    corners = np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]])
    f = np.median(corners, axis=0)
    if (np.abs(corners - f).max(axis=1) <= tol).sum() < 3:
        return rgb
    # uniform rows a few pixels deep are a margin (trimming's job): a rotated image reaches into
    # every edge's first rows
    probe = rgb[[0, 2 + int(0.03 * h), h - 1, h - 3 - int(0.03 * h)]]
    edge_uniform = (np.abs(probe - f).max(axis=2) <= tol).mean(axis=1) >= 0.99
    if (edge_uniform[0] and edge_uniform[1]) or (edge_uniform[2] and edge_uniform[3]):
        return rgb
    match = np.abs(rgb - f).max(axis=2) <= tol
    left = np.cumprod(match, axis=1).astype(bool)
    right = np.cumprod(match[:, ::-1], axis=1)[:, ::-1].astype(bool)
    nl, nr = left.sum(1), right.sum(1)
    rows = np.flatnonzero((nl < w) & (nl + nr < w))
    if (left | right).mean() < 0.005 or rows.size < h // 2:
        return rgb
    xl = np.minimum(nl[rows] + 2, w - 1)
    xr = np.maximum(w - 1 - nr[rows] - 2, 0)
    inside = np.concatenate([rgb[rows, xl], rgb[rows, xr]])
    deeper = np.concatenate([rgb[rows, np.minimum(xl + 8, w - 1)], rgb[rows, np.maximum(xr - 8, 0)]])
    bg = np.median(inside, axis=0)
    if (np.abs(inside - bg).max(axis=1) <= tol).mean() < 0.7 or np.abs(bg - f).max() <= tol:
        return rgb
    if (np.abs(deeper - bg).max(axis=1) <= tol).mean() < 0.6:
        return rgb
    d = bg - f
    t = np.clip(((rgb - f) @ d) / max(float(d @ d), 1e-6), 0, 1)
    near = np.abs(rgb - (f + t[..., None] * d)).max(axis=2) <= tol
    reach = np.cumprod(near, axis=1).astype(bool) | np.cumprod(near[:, ::-1], axis=1)[:, ::-1].astype(bool)
    out = rgb.copy()
    out[reach] = bg
    return out


def _trim(gray: np.ndarray, rgb: np.ndarray, tol: float, max_trim: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut uniform margins of any colour, repeatedly (a border, then the image's own background).

    A margin line has ≥90 % of its pixels within 3 levels and ≥98 % within `tol` of the margin
    colour; away from the image edge a single such line is content (an axis, a frame line), and
    two more lines go with each run (the blend of margin and content that resampling leaves).
    """
    h0, w0 = gray.shape
    top = bottom = left = right = 0

    def run(lines: np.ndarray, limit: int, done: int) -> int:
        if limit <= 0:
            return 0
        d = np.abs(lines[: limit + 1] - np.median(lines[0]))
        ok = ((d <= 3).mean(axis=1) >= 0.9) & ((d <= tol).mean(axis=1) >= 0.98)
        if not ok[0]:
            return 0
        bad = np.flatnonzero(~ok[:limit])
        n = int(bad[0]) if bad.size else limit
        # at the image edge even a thin run is a margin (a 5-px border shrunk to 2 px); further in,
        # a single line is content
        return min(n + 2, limit) if n >= (2 if done else 1) else 0

    for _ in range(3):
        g = gray[top : h0 - bottom, left : w0 - right]
        if min(g.shape) < 16:
            break
        t = run(g, int(h0 * max_trim) - top, top)
        b = run(g[::-1], int(h0 * max_trim) - bottom, bottom)
        l_ = run(g.T, int(w0 * max_trim) - left, left)
        r = run(g.T[::-1], int(w0 * max_trim) - right, right)
        if not (t or b or l_ or r):
            break
        top, bottom, left, right = top + t, bottom + b, left + l_, right + r
    if h0 - top - bottom < 8 or w0 - left - right < 8:
        return gray, rgb
    return gray[top : h0 - bottom, left : w0 - right], rgb[top : h0 - bottom, left : w0 - right]


# ---------------------------------------------------------------------------------------------
# descriptors


def _orientations(g: np.ndarray, nb: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi) / np.pi * nb
    b0 = np.floor(ang).astype(np.int64) % nb
    return mag, b0, ang - np.floor(ang)


def _hog(mag: np.ndarray, b0: np.ndarray, fr: np.ndarray, cells: int, nb: int = 8) -> np.ndarray:
    """Soft-binned orientation histograms on a cells×cells grid, pooled with their mirror image."""
    h, w = mag.shape
    ch, cw = h // cells, w // cells
    mag, b0, fr = mag[: ch * cells, : cw * cells], b0[: ch * cells, : cw * cells], fr[: ch * cells, : cw * cells]
    cid = (np.arange(ch * cells)[:, None] // ch) * cells + (np.arange(cw * cells)[None, :] // cw)
    n = cells * cells * nb
    hist = np.bincount((cid * nb + b0).ravel(), (mag * (1 - fr)).ravel(), n)
    hist += np.bincount((cid * nb + (b0 + 1) % nb).ravel(), (mag * fr).ravel(), n)
    hist = hist.reshape(cells, cells, nb)
    # a mirror maps column j to cells-1-j and orientation bin k (centred on k*pi/nb) to -k
    mirrored = np.roll(hist[:, ::-1, ::-1], 1, axis=-1)
    return np.sqrt((hist + mirrored)[:, : (cells + 1) // 2])


def _polar_index(rr: np.ndarray, ang: np.ndarray, ring_edges: Sequence[float], sectors: int):
    """Soft sector assignment: (flat bin of the lower sector, of the upper, weight of the upper, n rings)."""
    rings = len(ring_edges) - 1
    ring = np.searchsorted(ring_edges, rr, side="right") - 1
    ring = np.where((ring < 0) | (ring >= rings), rings, ring)  # outside: a bin that is dropped
    pos = ang * sectors - 0.5
    s0 = np.floor(pos).astype(np.int64)
    fr = pos - s0
    i0 = ring * sectors + np.clip(s0, 0, sectors - 1)
    i1 = ring * sectors + np.clip(s0 + 1, 0, sectors - 1)
    return i0, i1, fr, rings


def _soft_mean(v: np.ndarray, i0: np.ndarray, i1: np.ndarray, fr: np.ndarray, nb: int) -> np.ndarray:
    num = np.bincount(i0, v * (1 - fr), nb) + np.bincount(i1, v * fr, nb)
    den = np.bincount(i0, 1 - fr, nb) + np.bincount(i1, fr, nb)
    return np.where(den > 0.5, num / np.maximum(den, 1e-6), v.mean())


class OfflineEmbedder:
    """Weight-free near-copy embedder (see the module docstring). Picklable; prepare is pure."""

    decode_side = 128  # decoders may hand over images this small (JPEG draft mode)

    def __init__(self, config: OfflineEmbedderConfig | None = None) -> None:
        self.config = config or OfflineEmbedderConfig()

    @property
    def model_id(self) -> str:
        return f"dedup-assets/offline-{VERSION}"

    @property
    def dim(self) -> int:
        return DIM

    @property
    def duplicate_threshold(self) -> float:
        return DUPLICATE_THRESHOLD

    def normalize_frame(self, image: Image.Image) -> np.ndarray:
        """The content box of an image as float32 RGB (thumbnail, caption strip, fill, margins)."""
        img = image.convert("RGB")
        if max(img.size) > THUMB:
            img = img.copy()
            img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
        rgb = np.asarray(img, dtype=np.float32)
        if self.config.remove_caption_strips and min(rgb.shape[:2]) >= 16:
            t, b = _caption_cut(rgb)
            if t or b:
                rgb = rgb[t : rgb.shape[0] - b]
        if self.config.repair_rotation_fill and min(rgb.shape[:2]) >= 16:
            rgb = _repair_rotation_fill(rgb)
        gray = rgb @ _LUMA
        _, rgb = _trim(gray, rgb, self.config.trim_tolerance, self.config.max_trim)
        return rgb

    def parts(self, image: Image.Image) -> dict[str, np.ndarray]:
        """The unweighted descriptor parts, each unit-norm (for inspection and calibration)."""
        rgb = self.normalize_frame(image)
        gray = np.ascontiguousarray(rgb @ _LUMA)
        p: dict[str, np.ndarray] = {}
        g = np.asarray(_img(gray).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
        p["lay3"] = _unit(_sym(_box(g, 3)))
        p["lay6"] = _unit(_sym(_box(g, 6)))
        mag, b0, fr = _orientations(g)
        p["hog1"] = _unit(_hog(mag, b0, fr, 1))
        p["hog3"] = _unit(_hog(mag, b0, fr, 3))
        centre = g[13:51, 13:51]  # the central 60 %: survives crops, borders and caption bars
        p["c60hog2"] = _unit(_hog(*_orientations(centre), 2))
        z = (g - g.mean()) / (g.std() + 1e-3)
        p["lumhist"] = _unit(np.histogram(np.clip(z, -2.5, 2.5), bins=16, range=(-2.5, 2.5))[0])
        small = np.stack([_box(np.ascontiguousarray(rgb[..., k]), 8) for k in range(3)], -1)
        chroma = small - small.mean(axis=2, keepdims=True)
        for n in (2, 4):
            cc = np.stack([_box(np.ascontiguousarray(chroma[..., k]), n) for k in range(3)], -1)
            v = _sym(cc).ravel()
            # the constant is "no colour": gray images agree on it instead of on JPEG chroma noise
            p[f"col{n}"] = _unit_nc(np.append(v, 12.0 * np.sqrt(v.size)))
        p.update(self._polar_parts(gray))
        return p

    @staticmethod
    def _polar_parts(gray: np.ndarray) -> dict[str, np.ndarray]:
        hh, ww = gray.shape
        scale = np.sqrt(SIDE * SIDE / (hh * ww))  # aspect kept: a crop shifts, it does not stretch
        w, h = max(8, round(ww * scale)), max(8, round(hh * scale))
        ga = np.asarray(_img(gray).resize((w, h), Image.Resampling.BILINEAR))
        blur = np.asarray(_img(_box(ga, max(2, w // 4), max(2, h // 4))).resize((w, h), Image.Resampling.BILINEAR))
        edges = np.abs(ga - blur).ravel()
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        xx -= (w - 1) / 2
        yy -= (h - 1) / 2
        rr = (np.hypot(xx, yy) / (SIDE / 2)).ravel()
        theta = (np.arctan2(xx, -yy) / np.pi).ravel()  # 0 up, ±1 down; sign = side
        folded = np.abs(theta)
        lum = ga.ravel()
        p: dict[str, np.ndarray] = {}
        i0, i1, fr, rings = _polar_index(rr, folded, (0.1, 0.5, 0.9), 8)
        nb = (rings + 1) * 8
        p["hub8_edge"] = _unit(np.sqrt(_soft_mean(edges, i0, i1, fr, nb)[: rings * 8]))
        p["hub8_lum"] = _unit(_soft_mean(lum, i0, i1, fr, nb)[: rings * 8])
        centred = lum - lum.mean()
        side = (theta < 0).astype(np.int64)
        for name, edges_r, sectors in (("anti8", (0.1, 0.5, 0.9), 8), ("anti6", (0.1, 0.45, 0.85), 6)):
            i0, i1, fr, rings = _polar_index(rr, folded, edges_r, sectors)
            nb = (rings + 1) * sectors * 2
            m = _soft_mean(centred, i0 * 2 + side, i1 * 2 + side, fr, nb).reshape(rings + 1, sectors, 2)[:rings]
            anti = (m[..., 0] - m[..., 1]).ravel()
            anti = anti / (np.linalg.norm(anti) + 1e-6)
            p[f"{name}_prod"] = _unit_nc(np.outer(anti, anti)[np.triu_indices(anti.size)])
            if name == "anti8":
                p["anti8_sym"] = _unit((m[..., 0] + m[..., 1]).ravel())
        return p

    def prepare(self, image: Image.Image) -> np.ndarray:
        parts = self.parts(image)
        v = np.concatenate([parts[k] * np.float32(np.sqrt(w)) for k, w in WEIGHTS.items()])
        out = np.zeros(DIM, np.float32)
        out[: v.size] = v  # 406 used; the rest stays zero so the dimension is a round 512
        return out

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, DIM), np.float32)
        return l2_normalize(np.stack(batch))

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
