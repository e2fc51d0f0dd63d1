"""A second labelled near-copy generator, for measuring on data nothing was fitted on.

`synth.copyset` (generator "A") draws its bases with PIL (`synth.bases`) and its edits with PIL
(`synth.transforms`); the offline embedder's weights and the verifier's thresholds were fitted on
its sets. This generator ("B") shares no code with it:

- bases (`HELDOUT_KINDS`): crops of the photographs that ship inside installed packages
  (matplotlib's `grace_hopper.jpg`, scikit-learn's `china.jpg` and `flower.jpg`) at random places
  and scales — two bases may be crops of one photograph that overlap by ≤ 30 %, a hard negative — and
  those photographs whole; the toolbar icons that ship with matplotlib on plain backgrounds; text
  cards of one template with other words (OpenCV Hershey fonts); clocks drawn with OpenCV (another
  design from generator A's, numbers on the dial); digit strings; abstract art (random polygons and
  lines);
- edits (`HELDOUT_EDITS`), implemented with OpenCV and numpy, with other parameter ranges than A:
  resize (0.4–1.8×, area/linear), re-encode (JPEG 25–90 or WebP), crop (≤ 15 % per side), flip,
  rotation (≤ 10°, reflected or replicated border), jitter (gamma and hue), grayscale, borders
  (3–15 %, solid or replicated), caption bars (10–18 % of the height, Hershey text), watermarks
  (coloured or white text, 30–60 % opaque, sometimes tiled), and 2–3 edits at once.

Grain and labels as in `synth.copyset.CopySet`: one image per row; two images are a true duplicate
pair exactly when they share an origin. Deterministic by seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dedup_assets.synth.copyset import CopySet

HELDOUT_KINDS = ("photo_crop", "photo_full", "icon", "text_card", "clock", "digits", "abstract")
_WORDS = ("alpha", "delta", "orbit", "canvas", "signal", "harvest", "engine", "summit", "pixel", "amber",
          "nova", "ledger", "tide", "ranch", "quill", "falls", "static", "ember", "north", "index")


def _cv2():  # noqa: ANN202
    import cv2

    return cv2


def package_photographs() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) of the photographs that ship in installed packages (at least one)."""
    out = []
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            out.append(("grace_hopper", np.asarray(Image.open(p).convert("RGB"))))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images):
            out.append((name, np.asarray(img, dtype=np.uint8)))
    except ImportError:
        pass
    if not out:
        raise RuntimeError("no package photographs found (matplotlib or scikit-learn sample images)")
    return out


def package_icons() -> list[np.ndarray]:
    """RGBA arrays of matplotlib's large toolbar icons (and its logo)."""
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "images"
    icons = [np.asarray(Image.open(p).convert("RGBA")) for p in sorted(d.glob("*_large.png"))]
    logo = d / "matplotlib_large.png"
    if logo.exists():
        icons.append(np.asarray(Image.open(logo).convert("RGBA")))
    return icons


def _put(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color, thick: int, font: int = 0) -> None:  # noqa: ANN001
    cv2 = _cv2()
    cv2.putText(img, text, org, [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX,
                                 cv2.FONT_HERSHEY_COMPLEX][font % 4], scale, color, thick, cv2.LINE_AA)


MAX_CROP_OVERLAP = 0.3  # two photo_crop bases share at most this fraction of the smaller one


def _photo_crop(rng: np.random.Generator, photos, taken: dict) -> np.ndarray | None:  # noqa: ANN001
    """A crop of a package photograph that overlaps every earlier crop of it by ≤ MAX_CROP_OVERLAP
    of the smaller (so that the labels are well defined: a copy's crop keeps ≥ 49 %); None when
    no such crop is left."""
    cv2 = _cv2()
    for _ in range(200):
        p = int(rng.integers(len(photos)))
        ph = photos[p][1]
        h, w = ph.shape[:2]
        f = float(rng.uniform(0.25, 0.5))
        ch, cw = int(h * f), min(w, int(w * f * rng.uniform(0.8, 1.25)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        ok = True
        for (y2, x2, ch2, cw2) in taken.get(p, []):
            inter = max(0, min(y + ch, y2 + ch2) - max(y, y2)) * max(0, min(x + cw, x2 + cw2) - max(x, x2))
            if inter > MAX_CROP_OVERLAP * min(ch * cw, ch2 * cw2):
                ok = False
                break
        if ok:
            break
    else:
        return None
    taken.setdefault(p, []).append((y, x, ch, cw))
    crop = ph[y:y + ch, x:x + cw]
    s = 360 / max(crop.shape[:2])
    return cv2.resize(crop, (round(crop.shape[1] * s), round(crop.shape[0] * s)), interpolation=cv2.INTER_AREA)


def _photo_full(rng: np.random.Generator, photos, k: int) -> np.ndarray:  # noqa: ANN001
    cv2 = _cv2()
    _, ph = photos[k % len(photos)]
    s = float(rng.uniform(300, 420)) / max(ph.shape[:2])
    return cv2.resize(ph, (round(ph.shape[1] * s), round(ph.shape[0] * s)), interpolation=cv2.INTER_AREA)


def _icon(rng: np.random.Generator, icons, k: int) -> np.ndarray:  # noqa: ANN001
    cv2 = _cv2()
    icon = icons[k % len(icons)]
    side = int(rng.integers(72, 120))
    icon = cv2.resize(icon, (side, side), interpolation=cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_CUBIC)
    w, h = int(rng.integers(200, 300)), int(rng.integers(200, 300))
    bg = np.full((h, w, 3), rng.integers(150, 256, 3), np.uint8)
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    a = icon[..., 3:4].astype(np.float32) / 255
    bg[y:y + side, x:x + side] = (icon[..., :3] * a + bg[y:y + side, x:x + side] * (1 - a)).astype(np.uint8)
    return bg


def _text_card(rng: np.random.Generator, template: int) -> np.ndarray:
    cv2 = _cv2()
    t = np.random.default_rng(1000 + template)  # the template: colours, header, layout
    w, h = 400, 300
    img = np.full((h, w, 3), t.integers(200, 256, 3), np.uint8)
    head = tuple(int(c) for c in t.integers(0, 120, 3))
    cv2.rectangle(img, (0, 0), (w - 1, 56), head, -1)
    cv2.rectangle(img, (6, 6), (w - 7, h - 7), head, 3)
    _put(img, ["NOTICE", "BULLETIN", "MEMO", "UPDATE"][template % 4], (18, 40), 1.1, (255, 255, 255), 2, template)
    for line in range(3):
        words = " ".join(rng.choice(_WORDS, 2))
        _put(img, words, (22, 110 + 60 * line), float(t.uniform(0.9, 1.2)), (20, 20, 20), 2, template + 1)
    return img


def _clock(rng: np.random.Generator, design: int) -> np.ndarray:
    cv2 = _cv2()
    d = np.random.default_rng(2000 + design)
    s = 300
    img = np.full((s, s, 3), d.integers(180, 256, 3), np.uint8)
    c, r = s // 2, int(s * 0.42)
    ink = tuple(int(v) for v in d.integers(0, 90, 3))
    cv2.circle(img, (c, c), r, tuple(int(v) for v in d.integers(200, 256, 3)), -1)
    cv2.circle(img, (c, c), r, ink, 4)
    for n in range(1, 13):
        a = n * math.pi / 6
        _put(img, str(n), (int(c + 0.8 * r * math.sin(a)) - 9, int(c - 0.8 * r * math.cos(a)) + 8), 0.6, ink, 2, design)
    hour, minute = int(rng.integers(0, 12)), int(rng.integers(0, 12)) * 5
    for frac, ang, th in ((0.5, (hour + minute / 60) * math.pi / 6, 7), (0.75, minute * math.pi / 30, 4)):
        cv2.line(img, (c, c), (int(c + frac * r * math.sin(ang)), int(c - frac * r * math.cos(ang))), ink, th, cv2.LINE_AA)
    return img


def _digits(rng: np.random.Generator) -> np.ndarray:
    img = np.full((200, 360, 3), rng.integers(0, 256, 3), np.uint8)
    fg = tuple(int(255 - v) for v in img[0, 0])
    _put(img, "".join(str(v) for v in rng.integers(0, 10, int(rng.integers(3, 6)))), (20, 140), 3.2, fg, 8,
         int(rng.integers(4)))
    return img


def _abstract(rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    w, h = int(rng.integers(280, 400)), int(rng.integers(240, 340))
    img = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(int(rng.integers(6, 14))):
        pts = rng.integers(0, [w, h], (int(rng.integers(3, 7)), 2)).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(3, 9))):
        p, q = rng.integers(0, [w, h], 2), rng.integers(0, [w, h], 2)
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), tuple(int(v) for v in rng.integers(0, 256, 3)),
                 int(rng.integers(2, 9)))
    return img


def heldout_bases(n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """n (kind, RGB array) bases cycling through HELDOUT_KINDS; text cards share 3 templates and
    clocks 3 designs, so one layout with other content recurs (hard negatives)."""
    rng = np.random.default_rng(seed)
    photos, icons = package_photographs(), package_icons()
    taken: dict = {}
    out = []
    for i in range(n):
        kind = HELDOUT_KINDS[i % len(HELDOUT_KINDS)]
        k = i // len(HELDOUT_KINDS)
        # each photograph whole and each icon once: a repeat would be a true copy labelled as another base
        if kind == "photo_full" and k >= len(photos):
            kind = "photo_crop"
        if kind == "icon" and k >= len(icons):
            kind = "abstract"
        img = {
            "photo_crop": lambda: _photo_crop(rng, photos, taken),
            "photo_full": lambda: _photo_full(rng, photos, k),
            "icon": lambda: _icon(rng, icons, k),
            "text_card": lambda: _text_card(rng, k % 3),
            "clock": lambda: _clock(rng, k % 3),
            "digits": lambda: _digits(rng),
            "abstract": lambda: _abstract(rng),
        }[kind]()
        if img is None:  # the photographs are used up: abstract art instead
            kind, img = "abstract", _abstract(rng)
        out.append((kind, np.ascontiguousarray(img)))
    return out


# ------------------------------------------------------------------------------------ edits (OpenCV)
def _e_resize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    f = float(rng.uniform(0.4, 1.8))
    return cv2.resize(x, (max(8, round(x.shape[1] * f)), max(8, round(x.shape[0] * f))),
                      interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def _e_reencode(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    bgr = cv2.cvtColor(x, cv2.COLOR_RGB2BGR)
    if rng.random() < 0.7:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 91))])
    else:
        ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, int(rng.integers(30, 91))])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _e_crop(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    t, b = (rng.uniform(0, 0.15, 2) * h).astype(int)
    l, r = (rng.uniform(0, 0.15, 2) * w).astype(int)
    return np.ascontiguousarray(x[t:h - b, l:w - r])


def _e_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(_cv2().flip(x, 1))


def _e_rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    h, w = x.shape[:2]
    ang = float(rng.uniform(1.5, 10)) * (1 if rng.random() < 0.5 else -1)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
    return cv2.warpAffine(x, m, (w, h), borderMode=cv2.BORDER_REFLECT if rng.random() < 0.5 else cv2.BORDER_REPLICATE)


def _e_jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    g = float(rng.uniform(0.65, 1.5))
    y = (255 * (x.astype(np.float32) / 255) ** g).astype(np.uint8)
    hsv = cv2.cvtColor(y, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-12, 13))) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _e_gray(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    return cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _e_border(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    h, w = x.shape[:2]
    t, b = (rng.uniform(0.03, 0.15, 2) * h).astype(int)
    l, r = (rng.uniform(0.03, 0.15, 2) * w).astype(int)
    if rng.random() < 0.7:
        return cv2.copyMakeBorder(x, t, b, l, r, cv2.BORDER_CONSTANT, value=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return cv2.copyMakeBorder(x, t, b, l, r, cv2.BORDER_REPLICATE)


def _e_caption_bar(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    y = x.copy()
    h, w = y.shape[:2]
    bh = max(12, int(h * rng.uniform(0.1, 0.18)))
    top = rng.random() < 0.5
    y0 = 0 if top else h - bh
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    cv2.rectangle(y, (0, y0), (w, y0 + bh), bg, -1)
    fg = tuple(255 - v for v in bg)
    _put(y, " ".join(rng.choice(_WORDS, 3)), (6, y0 + int(bh * 0.72)), bh / 40, fg, max(1, bh // 16), int(rng.integers(4)))
    return y


def _e_watermark(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    layer = x.copy()
    h, w = x.shape[:2]
    color = (255, 255, 255) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 256, 3))
    text = str(rng.choice(["(c) studio", "DRAFT", "imgbank", "demo only"]))
    scale = max(0.5, h / 300 * float(rng.uniform(0.7, 1.2)))
    spots = [(int(rng.uniform(0, w * 0.4)), int(rng.uniform(h * 0.25, h * 0.9)))]
    if rng.random() < 0.3:  # tiled
        spots = [(int(w * a), int(h * b)) for a in (0.05, 0.55) for b in (0.35, 0.8)]
    for org in spots:
        _put(layer, text, org, scale, color, max(1, int(2 * scale)), int(rng.integers(4)))
    a = float(rng.uniform(0.3, 0.6))
    return (x.astype(np.float32) * (1 - a) + layer.astype(np.float32) * a).astype(np.uint8)


HELDOUT_EDITS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "resize": _e_resize,
    "reencode": _e_reencode,
    "crop": _e_crop,
    "flip": _e_flip,
    "rotate": _e_rotate,
    "jitter": _e_jitter,
    "grayscale": _e_gray,
    "border": _e_border,
    "caption_bar": _e_caption_bar,
    "watermark": _e_watermark,
}


def make_heldout_set(n_bases: int, copies_per_base: int, seed: int = 0) -> CopySet:
    """Each base, then copies_per_base copies: single edits in turn, every third copy 2–3 edits."""
    rng = np.random.default_rng(seed + 7919)
    names = list(HELDOUT_EDITS)
    images, origin, kinds, ops = [], [], [], []
    for b, (kind, base) in enumerate(heldout_bases(n_bases, seed=seed)):
        images.append(Image.fromarray(base))
        origin.append(b)
        kinds.append(kind)
        ops.append([])
        for c in range(copies_per_base):
            if c % 3 == 2:
                chosen = [str(v) for v in rng.choice(names, size=int(rng.integers(2, 4)), replace=False)]
            else:
                chosen = [names[(b * copies_per_base + c) % len(names)]]
            x = base
            for name in chosen:
                x = HELDOUT_EDITS[name](x, rng)
            images.append(Image.fromarray(np.ascontiguousarray(x)))
            origin.append(b)
            kinds.append(kind)
            ops.append(chosen)
    return CopySet(images, np.asarray(origin), kinds, ops)
