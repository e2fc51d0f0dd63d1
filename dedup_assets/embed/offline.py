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
     image with a plain background of its own end up on the same content box;
   - deskew: when the edges clearly share one pair of axes tilted by up to 12° (a chart, a rotated
     photo's frame edges), the frame is turned upright and its content box cut out again.
3. The orbit: the normalized frame, five 90 % crops of it (corners, centre) and ±5° turns. Each
   luminance descriptor is computed on all eight views and averaged, which makes it tolerant of
   the crops and small turns that copies carry at little cost in telling images apart.
4. Descriptors, each unit-normalized on its own (so one corrupted by a crop or a watermark leaves
   the others), all invariant to a horizontal flip by construction:
   - luminance layouts (3×3, 6×6) and an edge-energy layout (8×8), symmetrized with their mirror;
   - gradient-orientation histograms (whole image, 3×3 grid, centre 2×2) with soft orientation
     bins, mirrored bins pooled, square-rooted (robust to JPEG, small shifts and rotations);
   - contrast-normalized luminance histograms (16 and 32 bins);
   - colour, on the frame only: chroma layouts at 2×2 and 4×4 plus a constant "no colour"
     component (grayscale copies lose only this part, gray images do not amplify JPEG chroma
     noise), and a hue histogram weighted by chroma (brightness and contrast jitter leave it);
   - polar descriptors around the centre in aspect-preserving coordinates (rings × angular
     sectors of luminance; radial structure such as clock hands), folded left/right;
   - second-order polar terms: products of the left-minus-right (antisymmetric) parts, which are
     flip-invariant yet keep which features lie on the same side (1:10 vs 1:50 on a clock), the
     information that folding alone loses.
5. Two weightings, mixed per image by a photographic score (the share of gently shaded pixels
   at a fixed working size; see `photographic`): photographs are told apart by tone and colour
   and survive crops through them, flat images (graphics, text, drawings) by where their edges
   lie. A part's weight w makes its cosine count w in the total; the photo regime carries a
   constant component of weight PHOTO_OFFSET, so that one threshold serves both regimes (two
   photographs are near-copies at a lower descriptor cosine than two flat images are). A
   photograph and a flat image get a cosine of at most √(1 − PHOTO_OFFSET), far below the
   threshold: a copy whose score crossed over (heavy noise on a drawing, say) would be missed.
   The score is chosen to stay put under the benchmark's edits, resizes included (tested).
6. Concatenation (475 dimensions used), zero-padded to 512, L2 normalization.

The weights, the offset and `duplicate_threshold` come from benchmarks/fit_offline_weights.py:
per regime, a coordinate search that maximizes pair recall at pair precision ≥ 0.95 on labelled
near-copy sets (synth seeds 1, 3, 5; 400 bases × 4 copies each), the offset on all pairs, and the
threshold on a disjoint set (seed 2) for precision ≥ 0.95. See benchmarks/bench_offline_recall.py
for the measured precision/recall on seed 4, which takes no part in the fit.
"""


from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from dedup_assets.embed.base import l2_normalize

VERSION = "v3"
DIM = 512
SIDE = 64  # square working image for layouts and orientation histograms
THUMB = 160  # longest side the frame normalization works on
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

ORBIT_CROP = 0.9  # the orbit: the frame, five crops of this size, and these turns (degrees)
ORBIT_TURNS = (5.0, -5.0)
PARTS = ("lay3", "lay6", "hog1", "hog3", "c60hog2", "edge8", "lumhist", "lumhist32", "col2", "col4", "huehist",
         "hub8_lum", "anti8_prod", "anti8_sym", "anti6_prod")
# Weights of the parts for photographs and for flat images, and each regime's offset (see the
# module docstring for how they were obtained); the weights of a regime sum to 1 - its offset.
PHOTO_WEIGHTS: dict[str, float] = {
    "lay3": 0.0108, "lay6": 0.0045, "hog1": 0.0207, "hog3": 0.0529, "c60hog2": 0.037, "lumhist": 0.0314,
    "lumhist32": 0.0308, "col2": 0.0128, "col4": 0.0277, "huehist": 0.0154, "hub8_lum": 0.0041,
    "anti8_prod": 0.057, "anti8_sym": 0.0192, "anti6_prod": 0.0256,
}
FLAT_WEIGHTS: dict[str, float] = {
    "lay3": 0.01, "lay6": 0.005, "hog1": 0.1053, "hog3": 0.1627, "c60hog2": 0.2275, "edge8": 0.005,
    "lumhist": 0.0079, "lumhist32": 0.0177, "col4": 0.0426, "huehist": 0.0474, "hub8_lum": 0.0157,
    "anti8_prod": 0.1754, "anti8_sym": 0.0593, "anti6_prod": 0.1185,
}
PHOTO_OFFSET = 0.65
FLAT_OFFSET = 0.0
# Cosine at/above which two images are near-copies: pair precision ≥ 0.95 on the calibration set.
DUPLICATE_THRESHOLD = 0.909


@dataclass(frozen=True)
class OfflineEmbedderConfig:
    """Knobs of the frame normalization (the defaults are the calibrated ones)."""

    trim_tolerance: float = 12.0  # 0-255 levels a margin pixel may differ from the margin colour
    max_trim: float = 0.45  # never trim more than this fraction of a side
    remove_caption_strips: bool = True
    repair_rotation_fill: bool = True
    deskew: bool = True
    deskew_min_strength: float = 0.4  # 0..1: how clearly the edges share one pair of axes
    deskew_max_angle: float = 12.0  # degrees

    def __post_init__(self) -> None:
        if not 0 < self.max_trim < 0.5:
            raise ValueError(f"max_trim must be in (0, 0.5), got {self.max_trim}; set e.g. 0.45")
        if not 0 < self.trim_tolerance <= 64:
            raise ValueError(f"trim_tolerance must be in (0, 64], got {self.trim_tolerance}; set e.g. 12")


# ---------------------------------------------------------------------------------------------
# small helpers


def _border(rgb: np.ndarray) -> np.ndarray:
    """The pixels of the outermost rows and columns (their median fills a turned frame)."""
    return np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])


def _unit_nc(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else v


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
# deskew and the photographic gate


def _skew(gray: np.ndarray) -> tuple[float, float]:
    """(dominant axis angle in degrees, in (-45, 45]; its strength in [0, 1]).

    The fourth harmonic of gradient directions: edges along and across one pair of axes (a
    chart's axes and bars, a rotated frame's edges, a horizon and walls) add up; scattered
    directions (text glyphs, clock ticks, foliage) cancel. The strength weights directions by
    squared magnitude (hard edges decide whether there are axes at all); the angle weights them by
    magnitude, which central differences bias least (measured on tilted charts: within 0.5° of
    3–9° turns, where squared weights overshoot by a quarter).
    """
    gy, gx = np.gradient(gray)
    m2 = gx * gx + gy * gy
    z2 = (gx + 1j * gy) ** 2  # m² e^{2iθ}
    e4 = z2 * z2 / np.maximum(m2 * m2, 1e-12)  # e^{4iθ}
    strength = abs((m2 * e4).sum()) / (m2.sum() + 1e-6)
    m = np.sqrt(m2)
    angle = np.degrees(np.angle((m * e4).sum()) / 4)
    return float(angle), float(strength)


def _deskew(rgb: np.ndarray, min_strength: float, max_angle: float) -> np.ndarray:
    """Turn a frame whose dominant axes are tilted by ≤ max_angle back upright (else: unchanged).

    The upright content box is cut out of the turned canvas: a W×H frame holding content turned
    by a has content of w = (W cos a − H sin a) / cos 2a (and h alike), so a copy rotated with an
    expanding canvas gets its original box back, and one rotated inside its frame the box that
    the fill did not reach.
    """
    a, strength = _skew(rgb @ _LUMA)
    if strength < min_strength or abs(a) > max_angle or abs(a) < 0.3:
        return rgb
    hh, ww, _ = rgb.shape
    fill = tuple(int(v) for v in np.median(_border(rgb), axis=0))
    im = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    im = im.rotate(a, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill)
    r = np.radians(abs(a))
    c, s, c2 = np.cos(r), np.sin(r), np.cos(2 * r)
    w, h = (ww * c - hh * s) / c2, (hh * c - ww * s) / c2
    if w < 8 or h < 8:
        return rgb
    cw, ch = im.size
    box = (round((cw - w) / 2), round((ch - h) / 2), round((cw + w) / 2), round((ch + h) / 2))
    return np.asarray(im.crop(box), np.float32)


def photographic(gray: np.ndarray) -> float:
    """Soft 0..1 score of smooth shading (photographs) versus flat fills and hard edges (graphics,
    text, drawings), from a luminance image of about SIDE² pixels: the share of pixels with a
    gentle gradient (2–6 levels per pixel), through a logistic step at 17 %.

    At this fixed working size the score does not depend on the image's own resolution, and the
    ringing that bicubic downscaling leaves along hard edges is averaged away (measured on
    labelled sets, also after 0.3×–2× resizes: photo-like ≥ 0.25 in 99 %, flat ≤ 0.12 in 99 %).
    """
    gy, gx = np.gradient(gray)
    m = np.hypot(gx, gy)
    gentle = float(((m >= 2) & (m < 6)).mean())
    return float(1.0 / (1.0 + np.exp(-(gentle - 0.17) / 0.015)))


# ---------------------------------------------------------------------------------------------
# descriptors; luminance parts are computed on all views of the orbit at once (arrays lead with
# the view axis)


@lru_cache(maxsize=16)
def _box_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Area-averaging matrix (n_out × n_in): M @ x is a BOX resize of x along one axis."""
    edges = np.linspace(0, n_in, n_out + 1)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = edges[i], edges[i + 1]
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return m / m.sum(axis=1, keepdims=True)


def _boxes(x: np.ndarray, n: int) -> np.ndarray:
    """(V, h, w) → (V, n, n) area averages."""
    return np.einsum("ih,vhw,jw->vij", _box_matrix(n, x.shape[1]), x, _box_matrix(n, x.shape[2]), optimize=True)


def _units(x: np.ndarray, centre: bool = True) -> np.ndarray:
    """Each view's part flattened, (zero-mean,) unit-norm; a constant (or zero) part stays zero."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    if centre:
        x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 1e-6, n, 1.0)


def _syms(grid: np.ndarray) -> np.ndarray:
    """Pool (V, rows, cols, ...) grids with their mirror images; keep the left half."""
    s = grid + grid[:, :, ::-1]
    return s[:, :, : (grid.shape[2] + 1) // 2]


def _orientations(g: np.ndarray, nb: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gy, gx = np.gradient(g, axis=(1, 2))
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi) / np.pi * nb
    b0 = np.floor(ang).astype(np.int64) % nb
    return mag, b0, ang - np.floor(ang)


def _hogs(mag: np.ndarray, b0: np.ndarray, fr: np.ndarray, cells: int, nb: int = 8) -> np.ndarray:
    """Soft-binned orientation histograms on a cells×cells grid, pooled with their mirror image."""
    v, h, w = mag.shape
    ch, cw = h // cells, w // cells
    mag, b0, fr = mag[:, : ch * cells, : cw * cells], b0[:, : ch * cells, : cw * cells], fr[:, : ch * cells, : cw * cells]
    cid = (np.arange(ch * cells)[:, None] // ch) * cells + (np.arange(cw * cells)[None, :] // cw)
    base = (np.arange(v)[:, None, None] * cells * cells + cid[None]) * nb
    n = v * cells * cells * nb
    hist = np.bincount((base + b0).ravel(), (mag * (1 - fr)).ravel(), n)
    hist += np.bincount((base + (b0 + 1) % nb).ravel(), (mag * fr).ravel(), n)
    hist = hist.reshape(v, cells, cells, nb)
    # a mirror maps column j to cells-1-j and orientation bin k (centred on k*pi/nb) to -k
    mirrored = np.roll(hist[:, :, ::-1, ::-1], 1, axis=-1)
    return np.sqrt((hist + mirrored)[:, :, : (cells + 1) // 2])


def _histograms(z: np.ndarray, bins: int) -> np.ndarray:
    """Per-view histograms of (V, ...) values in [0, 1)."""
    v = len(z)
    idx = np.clip((z.reshape(v, -1) * bins).astype(np.int64), 0, bins - 1)
    return np.bincount((idx + np.arange(v)[:, None] * bins).ravel(), minlength=v * bins).reshape(v, bins).astype(np.float32)


@lru_cache(maxsize=64)
def _polar_layout(w: int, h: int, ring_edges: tuple[float, ...], sectors: int):
    """Soft sector assignment of a w×h grid around its centre, folded left/right.

    Returns (flat bin of the lower sector, of the upper, weight of the upper, side, n rings);
    radii in units of SIDE/2, so the rings keep their size whatever the aspect ratio.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx -= (w - 1) / 2
    yy -= (h - 1) / 2
    rr = (np.hypot(xx, yy) / (SIDE / 2)).ravel()
    theta = (np.arctan2(xx, -yy) / np.pi).ravel()  # 0 up, ±1 down; sign = side
    rings = len(ring_edges) - 1
    ring = np.searchsorted(ring_edges, rr, side="right") - 1
    ring = np.where((ring < 0) | (ring >= rings), rings, ring)  # outside: a bin that is dropped
    pos = np.abs(theta) * sectors - 0.5
    s0 = np.floor(pos).astype(np.int64)
    fr = (pos - s0).astype(np.float32)
    i0 = ring * sectors + np.clip(s0, 0, sectors - 1)
    i1 = ring * sectors + np.clip(s0 + 1, 0, sectors - 1)
    return i0, i1, fr, (theta < 0).astype(np.int64), rings


def _soft_means(vals: np.ndarray, i0: np.ndarray, i1: np.ndarray, fr: np.ndarray, nb: int) -> np.ndarray:
    """Per-view soft bin means of (V, P) values; empty bins get the view's mean."""
    v = len(vals)
    off = (np.arange(v) * nb)[:, None]
    num = np.bincount((i0 + off).ravel(), (vals * (1 - fr)).ravel(), v * nb)
    num += np.bincount((i1 + off).ravel(), (vals * fr).ravel(), v * nb)
    den = np.bincount(i0, 1 - fr, nb) + np.bincount(i1, fr, nb)
    return np.where(den > 0.5, num.reshape(v, nb) / np.maximum(den, 1e-6), vals.mean(axis=1, keepdims=True))


def _views(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The orbit of a normalized frame: itself, five 90 % crops (corners and centre) and ±5°
    turns, as SIDE×SIDE luminance and as aspect-kept luminance of about SIDE² pixels (for the
    polar parts); and the frame itself as SIDE×SIDE RGB (for the colour parts). Averaging a
    descriptor over the orbit makes it tolerant of the small crops and turns that copies carry,
    at little cost in telling different images apart."""
    hh, ww, _ = rgb.shape
    im = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    lum = Image.fromarray(np.clip(rgb @ _LUMA, 0, 255).astype(np.float32), "F")
    cw, ch = int(ww * ORBIT_CROP), int(hh * ORBIT_CROP)
    boxes = [(0, 0, ww, hh), (0, 0, cw, ch), (ww - cw, 0, ww, ch), (0, hh - ch, cw, hh), (ww - cw, hh - ch, ww, hh),
             ((ww - cw) // 2, (hh - ch) // 2, (ww - cw) // 2 + cw, (hh - ch) // 2 + ch)]
    fill = float(np.median(_border(rgb) @ _LUMA))
    turned = [lum.rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=fill) for a in ORBIT_TURNS]
    scale = np.sqrt(SIDE * SIDE / (hh * ww))  # aspect kept: a crop shifts, it does not stretch
    pw, ph = max(8, round(ww * scale)), max(8, round(hh * scale))
    sq, asp = [], []
    for size, out in (((SIDE, SIDE), sq), ((pw, ph), asp)):
        for b in boxes:
            out.append(np.asarray(lum.resize(size, Image.Resampling.BILINEAR, box=b)))
        for t in turned:
            out.append(np.asarray(t.resize(size, Image.Resampling.BILINEAR)))
    colour = np.asarray(im.resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float32)
    return np.stack(sq), np.stack(asp), colour


def _colour_parts(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Chroma layouts (the constant is "no colour": gray images agree on it instead of on JPEG
    chroma noise) and a hue histogram weighted by chroma (brightness and contrast leave it)."""
    p: dict[str, np.ndarray] = {}
    r, gg, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    small = np.stack([_boxes(c[None], 8)[0] for c in (r, gg, b)], axis=-1)  # (8, 8, 3)
    chroma = small - small.mean(axis=2, keepdims=True)
    for n in (2, 4):
        cc = chroma.reshape(n, 8 // n, n, 8 // n, 3).mean(axis=(1, 3))
        flat = _syms(cc[None]).ravel()
        p[f"col{n}"] = _unit_nc(np.append(flat, 12.0 * np.sqrt(flat.size)))
    hue = (np.arctan2(np.sqrt(3.0) * (gg - b), 2 * r - gg - b) / (2 * np.pi) + 0.5) * 18
    h0 = np.floor(hue).astype(np.int64) % 18
    hf = hue - np.floor(hue)
    wgt = np.clip(np.maximum(np.maximum(r, gg), b) - np.minimum(np.minimum(r, gg), b) - 10, 0, None)
    hist = np.bincount(h0.ravel(), (wgt * (1 - hf)).ravel(), 18) + np.bincount(((h0 + 1) % 18).ravel(), (wgt * hf).ravel(), 18)
    p["huehist"] = _unit_nc(np.append(np.sqrt(hist / hue.size), 2.0))
    return p


def _view_parts(g: np.ndarray, asp: np.ndarray) -> dict[str, np.ndarray]:
    """The luminance descriptor parts of every view: name → (V, d), each row unit-norm (or zero)."""
    v = len(g)
    p: dict[str, np.ndarray] = {}
    p["lay3"] = _units(_syms(_boxes(g, 3)))
    p["lay6"] = _units(_syms(_boxes(g, 6)))
    mag, b0, fr = _orientations(g)
    p["hog1"] = _units(_hogs(mag, b0, fr, 1))
    p["hog3"] = _units(_hogs(mag, b0, fr, 3))
    c = SIDE * 13 // 64
    p["c60hog2"] = _units(_hogs(mag[:, c:-c, c:-c], b0[:, c:-c, c:-c], fr[:, c:-c, c:-c], 2))  # the central 60 %
    p["edge8"] = _units(_syms(np.sqrt(_boxes(mag, 8))))
    z = (g - g.mean(axis=(1, 2), keepdims=True)) / (g.std(axis=(1, 2), keepdims=True) + 1e-3)
    zc = (np.clip(z, -2.5, 2.5) + 2.5) / 5.0
    p["lumhist"] = _units(_histograms(zc, 16))
    p["lumhist32"] = _units(np.sqrt(_histograms(zc, 32)))
    # polar parts around the centre (aspect kept): ring × sector means, and second-order terms of
    # the left-minus-right parts (flip-invariant, yet they keep which features share a side)
    ph, pw = asp.shape[1:3]
    lum = asp.reshape(v, -1)
    i0, i1, fr8, _, rings = _polar_layout(pw, ph, (0.1, 0.5, 0.9), 8)
    p["hub8_lum"] = _units(_soft_means(lum, i0, i1, fr8, (rings + 1) * 8)[:, : rings * 8])
    centred = lum - lum.mean(axis=1, keepdims=True)
    for name, edges_r, sectors in (("anti8", (0.1, 0.5, 0.9), 8), ("anti6", (0.1, 0.45, 0.85), 6)):
        i0, i1, fr, side, rings = _polar_layout(pw, ph, edges_r, sectors)
        nb = (rings + 1) * sectors * 2
        m = _soft_means(centred, i0 * 2 + side, i1 * 2 + side, fr, nb).reshape(v, rings + 1, sectors, 2)[:, :rings]
        anti = (m[..., 0] - m[..., 1]).reshape(v, -1)
        anti = anti / (np.linalg.norm(anti, axis=1, keepdims=True) + 1e-6)
        iu = np.triu_indices(anti.shape[1])
        p[f"{name}_prod"] = _units(np.einsum("vi,vj->vij", anti, anti)[:, iu[0], iu[1]], centre=False)
        if name == "anti8":
            p["anti8_sym"] = _units(m[..., 0] + m[..., 1])
    return p


def _combine(
    parts: dict[str, np.ndarray],
    photo: float,
    photo_weights: dict[str, float] = PHOTO_WEIGHTS,
    flat_weights: dict[str, float] = FLAT_WEIGHTS,
    photo_offset: float = PHOTO_OFFSET,
    flat_offset: float = FLAT_OFFSET,
) -> np.ndarray:
    """Weighted concatenation: a part's weight mixes its photo and flat weights by the photographic
    score, and two constant components carry each regime's offset (see the module docstring).
    The defaults are the shipped constants; the fit script passes trial values."""
    chunks = [parts[k] * np.float32(np.sqrt(photo * photo_weights.get(k, 0.0) + (1 - photo) * flat_weights.get(k, 0.0)))
              for k in PARTS]
    chunks.append(np.sqrt(np.array([photo * photo_offset, (1 - photo) * flat_offset], np.float32)))
    v = np.concatenate(chunks)
    out = np.zeros(DIM, np.float32)
    out[: v.size] = v
    return out


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
        """The content box of an image as float32 RGB (thumbnail, caption strip, fill, margins, tilt)."""
        img = image.convert("RGB")
        if max(img.size) > THUMB:
            img = img.copy()
            img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
        if min(img.size) < 8:  # keep every later step well-defined for tiny images
            img = img.resize((max(8, img.width), max(8, img.height)), Image.Resampling.NEAREST)
        rgb = np.asarray(img, dtype=np.float32)
        cfg = self.config
        if cfg.remove_caption_strips and min(rgb.shape[:2]) >= 16:
            t, b = _caption_cut(rgb)
            if t or b:
                rgb = rgb[t : rgb.shape[0] - b]
        if cfg.repair_rotation_fill and min(rgb.shape[:2]) >= 16:
            rgb = _repair_rotation_fill(rgb)
        _, rgb = _trim(rgb @ _LUMA, rgb, cfg.trim_tolerance, cfg.max_trim)
        if cfg.deskew and min(rgb.shape[:2]) >= 16:
            turned = _deskew(rgb, cfg.deskew_min_strength, cfg.deskew_max_angle)
            if turned is not rgb:
                _, rgb = _trim(turned @ _LUMA, turned, cfg.trim_tolerance, cfg.max_trim)
        return rgb

    def describe(self, image: Image.Image) -> tuple[dict[str, np.ndarray], float]:
        """(the orbit-averaged descriptor parts, each unit-norm; the photographic score)."""
        rgb = self.normalize_frame(image)
        g, asp, colour = _views(rgb)
        photo = photographic(asp[0])
        parts = {k: _unit_nc(v.sum(axis=0)) for k, v in _view_parts(g, asp).items()}
        parts.update(_colour_parts(colour))
        return {k: parts[k] for k in PARTS}, photo

    def prepare(self, image: Image.Image) -> np.ndarray:
        return _combine(*self.describe(image))

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, DIM), np.float32)
        return l2_normalize(np.stack(batch))

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
