"""Geometric verification of candidate pairs: is image B the same picture as image A after edits?

Global vectors propose candidates; this module confirms or rejects each one with local features
(OpenCV SIFT), a RANSAC fit of a similarity transform (rotation, scale, translation; tried again
on the mirrored image for flips), and rules on what the fitted transform says:

1. `few_inliers`: fewer than `min_inliers` matches agree with one transform (different pictures,
   or pictures too different to align).
2. `implausible_transform`: the scale change between the two (both analysed at `max_side`) is
   outside [1/max_scale, max_scale].
3. `small_overlap`: the part of each picture that the other covers is below `min_overlap` — two
   crops of one photograph that overlap little, or a small crop against its full photograph.
4. `clustered_matches`: the agreeing matches span less than `min_spread` of the overlap and the
   rest of the overlap changed (the content comparison of rule 5, any direction, above
   `min_changed`): a shared logo or a common sub-graphic, not the picture. An icon on a plain
   ground matches on the icon only, but the rest is unchanged, so it passes.
5. `content_differs` (notion `copy` only): after aligning B onto A, compare the two pixel by
   pixel (grayscale, blurred, standardised over the overlap, tolerant of a pixel or two of
   misalignment; B's top and bottom `edge_band` left out, where caption bars go). Edits that
   *add* something — a semi-transparent watermark — push the changed pixels one way (lighter, or
   darker); a different picture on the same layout — a clock at another hour, other text on one
   template — removes something and adds something else, so its changes go both ways. The rule
   rejects when more than `max_changed` of the compared overlap changed, or more than
   `min_changed` changed and both directions carry at least `two_sided` of the change.

Two notions (`NOTIONS`): `copy` = the same picture after edits (all five rules);
`near_duplicate` = the seed's looser notion (OpenAI also removed the same clock at other times
of day, to stop memorisation): rules 1–4 only, so one layout with other content may group, two
crops that overlap little still do not.

Images with too few keypoints in either image (flat icons, blank cards; fewer than
`min_keypoints`, or a failed match with fewer than `low_texture_keypoints`) are `undecided`: the caller decides (the `verified_pairs` asset keeps such a pair
only when its global similarity reaches the strict τ).

Cost is bounded: each image is decoded once per step and its features (≤ `max_keypoints`, uint8
descriptors, ~70 KB at the defaults) are cached by the caller (`FeatureCache`); the mirrored
features are computed only when a pair fails unmirrored.

No Dagster, no I/O here: inputs are PIL images or uint8 arrays.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

__all__ = [
    "NOTIONS",
    "REASONS",
    "FeatureCache",
    "Features",
    "Verdict",
    "VerifyConfig",
    "VerifyStats",
    "extract_features",
    "verify_candidates",
    "verify_pair",
]

NOTIONS = ("copy", "near_duplicate")
REASONS = (
    "few_features", "few_inliers", "implausible_transform", "small_overlap", "clustered_matches",
    "content_differs", "decode_error",
)


@dataclass(frozen=True)
class VerifyConfig:
    """Parameters of the verifier (units in the field comments)."""

    notion: str = "copy"  # "copy" or "near_duplicate" (module docstring)
    max_side: int = 384  # px: both images are analysed at this longest side
    max_keypoints: int = 600  # per image (the strongest SIFT responses)
    min_keypoints: int = 12  # below this in either image the pair is undecided
    low_texture_keypoints: int = 80  # a few_inliers result with fewer keypoints than this in either image is undecided
    ratio: float = 0.8  # Lowe's ratio test on the two nearest descriptors
    ransac_px: float = 6.0  # px at max_side: RANSAC reprojection tolerance
    min_inliers: int = 10  # matches that agree with one similarity transform
    max_scale: float = 4.0  # largest accepted scale change between the two
    min_overlap: float = 0.45  # fraction of EACH image covered by the other, after alignment
    min_spread: float = 0.2  # hull of the agreeing matches / the overlap (in A); below it the rest must be unchanged
    content: str = "intensity"  # content comparison: "intensity" (standardised gray) or "edges" (gradient magnitude)
    edge_change: float = 0.35  # edges: gradient (fraction of the 95th percentile) that counts as structure
    pixel_change: float = 0.8  # content check: standard deviations outside the other image's local range
    min_changed: float = 0.01  # copy: changed fraction of the compared overlap above which direction counts
    max_changed: float = 0.25  # copy: changed fraction above which the pair is rejected anyway
    two_sided: float = 0.1  # copy: darker and lighter changes each at least this share → another picture
    edge_band: float = 0.22  # fraction of B's height at its top and bottom not compared (caption bars)

    def __post_init__(self) -> None:
        if self.notion not in NOTIONS:
            raise ValueError(f"notion must be one of {NOTIONS}, got {self.notion!r}")
        if self.max_side < 32 or self.max_keypoints < 8 or self.min_inliers < 3:
            raise ValueError("max_side >= 32, max_keypoints >= 8 and min_inliers >= 3 are required")
        if not 0 < self.min_overlap <= 1 or not 0 <= self.min_spread <= 1:
            raise ValueError("min_overlap must be in (0, 1] and min_spread in [0, 1]")


@dataclass
class Features:
    """Keypoints of one image at the analysis size, plus its small grayscale for the content check."""

    size: tuple[int, int]  # (width, height) at the analysis size
    xy: np.ndarray  # (n, 2) float32
    desc: np.ndarray  # (n, 128) uint8
    gray: np.ndarray  # (h, w) uint8
    mirrored: "Features | None" = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        own = self.xy.nbytes + self.desc.nbytes + self.gray.nbytes
        return own + (self.mirrored.nbytes if self.mirrored is not None else 0)


@dataclass(frozen=True)
class Verdict:
    """The outcome for one pair. `accepted` is None when undecided (too few keypoints)."""

    accepted: bool | None
    reason: str | None  # None when accepted, else one of REASONS
    inliers: int = 0
    overlap: float = 0.0  # min over the two images of the covered fraction
    spread: float = 0.0
    changed: float = 0.0  # fraction of overlap tiles whose content changed (copy notion)
    mirrored: bool = False
    transform: tuple[float, ...] = ()  # the 2×3 matrix A → B at the analysis sizes, row-major
    points_a: np.ndarray | None = field(default=None, repr=False, compare=False)  # agreeing matches in A
    points_b: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def score(self) -> float:
        """A number to rank verified pairs by: agreeing matches, weighted by the overlap."""
        return float(self.inliers * self.overlap)


def _cv2():  # noqa: ANN202
    import cv2

    cv2.setRNGSeed(0)  # RANSAC samples are drawn from OpenCV's RNG: same pair, same verdict
    return cv2


def _gray(image, max_side: int) -> np.ndarray:  # noqa: ANN001 - PIL image or array
    cv2 = _cv2()
    if hasattr(image, "convert"):
        arr = np.asarray(image.convert("L"))
    else:
        arr = np.asarray(image)
        if arr.ndim == 3:
            arr = cv2.cvtColor(arr[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape
    f = max_side / max(h, w)
    if abs(f - 1) > 1e-3:
        arr = cv2.resize(arr, (max(1, round(w * f)), max(1, round(h * f))),
                         interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    return arr


def _sift(gray: np.ndarray, cfg: VerifyConfig) -> tuple[np.ndarray, np.ndarray]:
    cv2 = _cv2()
    sift = cv2.SIFT_create(nfeatures=cfg.max_keypoints, contrastThreshold=0.02)
    kps, desc = sift.detectAndCompute(gray, None)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8)
    xy = np.asarray([k.pt for k in kps], dtype=np.float32)
    return xy[: cfg.max_keypoints], np.clip(np.rint(desc[: cfg.max_keypoints]), 0, 255).astype(np.uint8)


def extract_features(image, cfg: VerifyConfig = VerifyConfig()) -> Features:  # noqa: ANN001
    """Features of one image (a PIL image or an RGB/gray uint8 array)."""
    gray = _gray(image, cfg.max_side)
    xy, desc = _sift(gray, cfg)
    return Features((gray.shape[1], gray.shape[0]), xy, desc, gray)


def _mirrored(f: Features, cfg: VerifyConfig) -> Features:
    if f.mirrored is None:
        g = np.ascontiguousarray(f.gray[:, ::-1])
        xy, desc = _sift(g, cfg)
        f.mirrored = Features(f.size, xy, desc, g)
    return f.mirrored


def _matches(a: Features, b: Features, cfg: VerifyConfig) -> tuple[np.ndarray, np.ndarray]:
    cv2 = _cv2()
    if a.desc.shape[0] < 2 or b.desc.shape[0] < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    m = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.desc.astype(np.float32), b.desc.astype(np.float32), k=2)
    good = [p[0] for p in m if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance]
    if not good:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    qa = np.asarray([g.queryIdx for g in good])
    qb = np.asarray([g.trainIdx for g in good])
    # one match per point of B (the first, i.e. an arbitrary but deterministic one)
    _, first = np.unique(qb, return_index=True)
    return a.xy[qa[first]], b.xy[qb[first]]


def _fit(pa: np.ndarray, pb: np.ndarray, cfg: VerifyConfig) -> tuple[np.ndarray | None, np.ndarray]:
    cv2 = _cv2()
    if pa.shape[0] < cfg.min_inliers:
        return None, np.zeros(pa.shape[0], bool)
    m, mask = cv2.estimateAffinePartial2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_px,
                                          maxIters=4000, confidence=0.995, refineIters=10)
    if m is None or mask is None:
        return None, np.zeros(pa.shape[0], bool)
    return m.astype(np.float64), mask.ravel().astype(bool)


def _rect(w: int, h: int) -> np.ndarray:
    return np.asarray([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def _overlap(m: np.ndarray, a: Features, b: Features) -> tuple[float, float, float]:
    """(covered fraction of A, covered fraction of B, overlap area in A's pixels)."""
    cv2 = _cv2()
    wa, ha = a.size
    wb, hb = b.size
    area_b, _ = cv2.intersectConvexConvex(_apply(m, _rect(wa, ha)), _rect(wb, hb))
    scale2 = abs(float(np.linalg.det(m[:, :2]))) or 1e-12
    area_a = float(area_b) / scale2
    return area_a / (wa * ha), float(area_b) / (wb * hb), area_a


def _hull_area(pts: np.ndarray) -> float:
    cv2 = _cv2()
    if pts.shape[0] < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(pts.astype(np.float32))))


def _changed(m: np.ndarray, a: Features, b: Features, cfg: VerifyConfig) -> tuple[float, bool]:
    """Content check in A's frame: (changed fraction of the compared overlap, looks like another picture).

    B is warped onto A; both are blurred and standardised over the overlap. A pixel has changed
    when it lies more than `pixel_change` standard deviations outside the range of the other
    image's 5×5 neighbourhood (either way round), which tolerates the pixel or two of
    misalignment that resampling leaves. The top and bottom `edge_band` of B (where caption bars
    go) are not compared."""
    cv2 = _cv2()
    wa, ha = a.size
    wb, hb = b.size
    inv = cv2.invertAffineTransform(m)
    warped = cv2.warpAffine(b.gray, inv, (wa, ha), flags=cv2.INTER_LINEAR, borderValue=0)
    core = np.zeros((hb, wb), np.uint8)
    cut = int(round(cfg.edge_band * hb))
    core[cut:hb - cut] = 255
    full = cv2.warpAffine(np.full((hb, wb), 255, np.uint8), inv, (wa, ha), flags=cv2.INTER_NEAREST, borderValue=0)
    valid = cv2.erode((full > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    compared = valid & (cv2.warpAffine(core, inv, (wa, ha), flags=cv2.INTER_NEAREST, borderValue=0) > 0)
    if compared.sum() < 64:
        return 0.0, False  # nothing left to compare outside the edge bands: geometry decides

    k = np.ones((5, 5), np.uint8)
    if cfg.content == "edges":
        def edges(x: np.ndarray) -> np.ndarray:
            x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 1.2)
            g = cv2.magnitude(cv2.Sobel(x, cv2.CV_32F, 1, 0), cv2.Sobel(x, cv2.CV_32F, 0, 1))
            return g / max(float(np.percentile(g[valid], 95)), 20.0)

        ea, eb = edges(a.gray), edges(warped)
        t = cfg.edge_change
        removed = compared & (ea > t) & (cv2.dilate(eb, k) < 0.5 * t)
        added = compared & (eb > t) & (cv2.dilate(ea, k) < 0.5 * t)
        p, q = float(added.sum()), float(removed.sum())
        frac = (p + q) / float(compared.sum())
    else:
        def z(x: np.ndarray) -> np.ndarray:
            x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 1.0)
            v = x[valid]
            return (x - v.mean()) / max(float(v.std()), 8.0)

        za, zb = z(a.gray), z(warped)
        t = cfg.pixel_change
        out_a = (za < cv2.erode(zb, k) - t) | (za > cv2.dilate(zb, k) + t)
        out_b = (zb < cv2.erode(za, k) - t) | (zb > cv2.dilate(za, k) + t)
        ch = compared & (out_a | out_b)
        frac = float(ch.sum() / compared.sum())
        signed = (zb - za)[ch]
        p, q = float(np.clip(signed, 0, None).sum()), float(np.clip(-signed, 0, None).sum())
    both = p + q > 0 and min(p, q) / (p + q) >= cfg.two_sided
    return frac, frac > cfg.max_changed or (frac > cfg.min_changed and both)


def _try(a: Features, b: Features, cfg: VerifyConfig, mirrored: bool) -> Verdict:
    pa, pb = _matches(a, b, cfg)
    m, mask = _fit(pa, pb, cfg)
    inl = int(mask.sum())
    if m is None or inl < cfg.min_inliers:
        return Verdict(False, "few_inliers", inliers=inl, mirrored=mirrored)
    flat = tuple(float(v) for v in m.ravel())
    ia, ib = pa[mask], pb[mask]
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if not 1 / cfg.max_scale <= scale <= cfg.max_scale:
        return Verdict(False, "implausible_transform", inliers=inl, mirrored=mirrored, transform=flat)
    cov_a, cov_b, area_a = _overlap(m, a, b)
    overlap = min(cov_a, cov_b)
    spread = _hull_area(ia) / max(area_a, 1e-9)
    common = dict(inliers=inl, overlap=overlap, spread=spread, mirrored=mirrored, transform=flat,
                  points_a=ia, points_b=ib)
    if overlap < cfg.min_overlap:
        return Verdict(False, "small_overlap", **common)
    frac = differs = None
    if spread < cfg.min_spread:
        # Matches on a small part only: the same picture if that part is all there is (an icon on a
        # plain ground, the rest unchanged), a shared logo if the rest of the overlap differs.
        frac, differs = _changed(m, a, b, cfg)
        if frac > cfg.min_changed:
            return Verdict(False, "clustered_matches", changed=frac, **common)
    if cfg.notion == "copy":
        if frac is None:
            frac, differs = _changed(m, a, b, cfg)
        if differs:
            return Verdict(False, "content_differs", changed=frac, **common)
        return Verdict(True, None, changed=frac, **common)
    return Verdict(True, None, **common)


def _unmirror(v: Verdict, b: Features) -> Verdict:
    """Points found against B's mirror image, in B's own coordinates (for the review picture)."""
    if v.points_b is None:
        return v
    pb = v.points_b.copy()
    pb[:, 0] = b.size[0] - pb[:, 0]
    return Verdict(v.accepted, v.reason, v.inliers, v.overlap, v.spread, v.changed, True, v.transform,
                   v.points_a, pb)


def verify_pair(a: Features, b: Features, cfg: VerifyConfig = VerifyConfig()) -> Verdict:
    """Is B the same picture as A (module docstring)? Tries B as is, then B mirrored."""
    if a.xy.shape[0] < cfg.min_keypoints or b.xy.shape[0] < cfg.min_keypoints:
        return Verdict(None, "few_features")
    direct = _try(a, b, cfg, mirrored=False)
    if direct.accepted:
        return direct
    flipped = _try(a, _mirrored(b, cfg), cfg, mirrored=True)
    # The mirrored fit wins when it is the better match: a flip leaves few unmirrored matches, or
    # (symmetric pictures) an unmirrored fit whose content differs. A confident unmirrored fit
    # rejected on its geometry is not overruled by a weaker mirrored one.
    better = flipped.inliers > direct.inliers or direct.reason in ("few_inliers", "content_differs")
    if better and (flipped.accepted or flipped.inliers > direct.inliers):
        direct = _unmirror(flipped, b)
    if direct.reason == "few_inliers" and min(a.xy.shape[0], b.xy.shape[0]) < cfg.low_texture_keypoints:
        # flat art has too few keypoints for a failed match to mean "different picture"
        return Verdict(None, "few_features", inliers=direct.inliers, mirrored=direct.mirrored)
    return direct


class FeatureCache:
    """Features by key, computed at most once while cached; least recently used dropped past
    `max_bytes`. `load(key)` returns the image (PIL or array) or raises; a failure is cached too."""

    def __init__(self, load: Callable[[Hashable], object], cfg: VerifyConfig, max_bytes: int = 256 << 20) -> None:
        self.load, self.cfg, self.max_bytes = load, cfg, int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Features | Exception, int]] = OrderedDict()
        self._bytes = 0
        self.decoded = self.hits = 0

    @staticmethod
    def _size(value: Features | Exception) -> int:
        return value.nbytes if isinstance(value, Features) else 64

    def get(self, key: Hashable) -> Features | Exception:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.decoded += 1
        try:
            value: Features | Exception = extract_features(self.load(key), self.cfg)
        except Exception as e:  # noqa: BLE001 - recorded per pair as decode_error
            value = e
        size = self._size(value)
        self._items[key] = (value, size)
        self._bytes += size
        self._evict()
        return value

    def refresh_size(self, key: Hashable) -> None:
        """Re-count an entry whose mirrored features were added after it was cached."""
        if key in self._items:
            value, old = self._items[key]
            new = self._size(value)
            self._items[key] = (value, new)
            self._bytes += new - old
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size


MAX_POINTS = 48  # agreeing matches kept per accepted pair (for the review picture)


def _points(pts: np.ndarray | None, size: tuple[int, int]) -> list[float] | None:
    if pts is None or pts.shape[0] == 0:
        return None
    step = max(1, pts.shape[0] // MAX_POINTS)
    p = pts[::step][:MAX_POINTS] / np.asarray(size, np.float32)
    return [round(float(v), 4) for v in p.ravel()]


@dataclass
class VerifyStats:
    pairs: int = 0
    accepted: int = 0
    undecided: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_decoded: int = 0
    cache_hits: int = 0


def verify_candidates(
    pairs,  # noqa: ANN001 - polars DataFrame: image_a, image_b, similarity, found_by, location_a, location_b
    load: Callable[[str], object],
    cfg: VerifyConfig,
    tau: float,
    cache_bytes: int = 256 << 20,
    progress: Callable[[VerifyStats], None] | None = None,
    progress_every: int = 2000,
):  # noqa: ANN201 - (polars DataFrame in VERIFIED_SCHEMA's columns, VerifyStats)
    """Verdicts for a frame of candidate pairs (one row out per row in, same order).

    A pair is a duplicate edge when accepted, or when undecided (too few keypoints, an image that
    cannot be decoded, no location) and its global similarity reaches `tau`: verification then
    neither adds nor removes anything. `load(location)` returns the image."""
    import time

    import polars as pl

    t0 = time.perf_counter()
    cache = FeatureCache(load, cfg, max_bytes=cache_bytes)
    st = VerifyStats()
    out: dict[str, list] = {k: [] for k in ("is_duplicate", "verdict", "inliers", "overlap", "changed", "mirrored",
                                            "points_a", "points_b")}
    locs_a, locs_b = pairs["location_a"].to_list(), pairs["location_b"].to_list()
    for n, (la, lb, sim) in enumerate(zip(locs_a, locs_b, pairs["similarity"].to_list()), 1):
        fa = cache.get(la) if la else KeyError("no location")
        fb = cache.get(lb) if lb else KeyError("no location")
        if isinstance(fa, Exception) or isinstance(fb, Exception):
            v = Verdict(None, "decode_error")
        else:
            v = verify_pair(fa, fb, cfg)
            if v.mirrored:
                cache.refresh_size(lb)
        if v.accepted:
            st.accepted += 1
            verdict, dup = "accepted", True
        elif v.accepted is None:
            st.undecided += 1
            verdict, dup = f"undecided:{v.reason}", float(sim) >= tau
        else:
            st.rejected[v.reason or "?"] = st.rejected.get(v.reason or "?", 0) + 1
            verdict, dup = f"rejected:{v.reason}", False
        out["is_duplicate"].append(dup)
        out["verdict"].append(verdict)
        out["inliers"].append(v.inliers)
        out["overlap"].append(v.overlap)
        out["changed"].append(v.changed)
        out["mirrored"].append(v.mirrored)
        out["points_a"].append(_points(v.points_a, fa.size) if v.accepted else None)
        out["points_b"].append(_points(v.points_b, fb.size) if v.accepted else None)
        st.pairs = n
        if progress is not None and n % progress_every == 0:
            st.seconds, st.images_decoded, st.cache_hits = time.perf_counter() - t0, cache.decoded, cache.hits
            progress(st)
    st.seconds, st.images_decoded, st.cache_hits = time.perf_counter() - t0, cache.decoded, cache.hits
    df = pairs.select("image_a", "image_b", "similarity", "found_by").with_columns(
        pl.Series("is_duplicate", out["is_duplicate"], pl.Boolean),
        pl.Series("verdict", out["verdict"], pl.String),
        pl.Series("inliers", out["inliers"], pl.Int32),
        pl.Series("overlap", out["overlap"], pl.Float32),
        pl.Series("changed", out["changed"], pl.Float32),
        pl.Series("mirrored", out["mirrored"], pl.Boolean),
        pl.Series("points_a", out["points_a"], pl.List(pl.Float32)),
        pl.Series("points_b", out["points_b"], pl.List(pl.Float32)),
    )
    return df, st
