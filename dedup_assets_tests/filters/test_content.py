"""The offline NSFW scorer (NudeNet) on images made here, and the nsfw filter inside a run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw, ImageFilter

from dedup_assets.filters.config import PrefilterConfig
from dedup_assets.filters.run import run_prefilter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nudenet") is None,
    reason="the optional extra 'nsfw' (nudenet) is not installed: pip install -e '.[nsfw]'",
)


def _sky(w: int = 480, h: int = 320) -> Image.Image:
    sky = np.zeros((h, w, 3), np.uint8)
    sky[..., 0] = np.linspace(60, 200, h)[:, None].astype(np.uint8)
    sky[..., 1] = np.linspace(120, 230, h)[:, None].astype(np.uint8)
    sky[..., 2] = 255
    return Image.fromarray(sky)


def _chart(w: int = 400, h: int = 300) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line([(30, 10), (30, h - 30), (w - 10, h - 30)], fill="black", width=2)
    for n, v in enumerate([120, 200, 80, 160, 230]):
        d.rectangle([50 + 65 * n, h - 30 - v, 95 + 65 * n, h - 31], fill=("#1f77b4", "#ff7f0e", "#2ca02c")[n % 3])
    return img


def _text_page(w: int = 360, h: int = 440) -> Image.Image:
    img = Image.new("RGB", (w, h), (250, 248, 240))
    d = ImageDraw.Draw(img)
    for line in range(18):
        d.text((20, 15 + 22 * line), f"line {line}: the quick brown fox jumps over the lazy dog", fill="black")
    return img


def _benign() -> list[Image.Image]:
    return [_sky(), _chart(), _sky(200, 600).convert("L"), _chart().convert("RGBA"), _text_page()]


def _skin_blobs(seed: int = 2) -> Image.Image:
    """Blurred skin-coloured ellipses: no person, yet the detector finds "exposed" parts in them."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (320, 256), tuple(int(v) for v in rng.integers(100, 200, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = int(rng.integers(0, 320)), int(rng.integers(0, 256)), int(rng.integers(30, 90))
        d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=(220, 170, 140))
    return img.filter(ImageFilter.GaussianBlur(4))


def test_scores_are_in_unit_range_and_benign_images_pass_the_default_threshold() -> None:
    from dedup_assets.filters.content import get_scorer

    scores = get_scorer().score(_benign())
    assert scores.dtype == np.float32 and scores.shape == (5,)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (scores < PrefilterConfig().nsfw_threshold).all()
    assert get_scorer().score([]).shape == (0,)


def test_an_image_is_seen_exactly_as_nudenet_sees_the_same_file(tmp_path: Path) -> None:
    # NudeNet's reference input is a file read by cv2 (BGR); the scorer's PIL path must match it,
    # or the channel order the model gets would differ from the one it is used with.
    from nudenet import NudeDetector

    from dedup_assets.filters.content import NsfwScorer

    image = _skin_blobs()
    image.save(tmp_path / "blobs.png")
    from_file = NudeDetector().detect(str(tmp_path / "blobs.png"))
    assert from_file, "the known-answer image must give at least one detection"
    assert NsfwScorer().detections([image]) == [from_file]


def test_the_score_is_the_highest_exposed_class_confidence() -> None:
    from dedup_assets.filters.content import EXPOSED_CLASSES, NsfwScorer

    scorer = NsfwScorer()
    image = _skin_blobs()
    dets = scorer.detections([image])[0]
    exposed = [d["score"] for d in dets if d["class"] in EXPOSED_CLASSES]
    assert exposed, "the known-answer image must give an exposed-class detection"
    assert scorer.score([image])[0] == pytest.approx(max(exposed))


def test_batched_detection_equals_one_image_at_a_time() -> None:
    from dedup_assets.filters.content import NsfwScorer

    images = _benign() + [_skin_blobs(2), _skin_blobs(18)]
    one = NsfwScorer(batch_size=1).detections(images)
    three = NsfwScorer(batch_size=3).detections(images)
    assert [[d["class"] for d in dets] for dets in one] == [[d["class"] for d in dets] for dets in three]
    for a, b in zip(one, three):
        assert [d["score"] for d in a] == pytest.approx([d["score"] for d in b], abs=1e-4)


def test_nsfw_filter_in_a_run_scores_passing_rows_and_records_a_failed_load(
    tmp_path: Path, make_index: Callable[[list[dict]], pl.DataFrame]
) -> None:
    paths = []
    for n, img in enumerate([_sky(), _chart()]):
        paths.append(tmp_path / f"{n}.png")
        img.save(paths[-1])
    caption = "a simple picture with soft colours"
    index = make_index([
        {"image_id": "s/a", "location": str(paths[0]), "caption": caption},
        {"image_id": "s/b", "location": str(paths[1]), "caption": caption},
        {"image_id": "s/c", "location": str(tmp_path / "gone.png"), "caption": caption},  # load raises
        {"image_id": "s/d", "location": str(paths[0]), "caption": caption, "width": 399},  # fails min_side first
    ])
    df = run_prefilter(index, PrefilterConfig(nsfw=True), load_image=Image.open)
    rows = {r["image_id"]: r for r in df.iter_rows(named=True)}
    assert df.height == 4
    assert rows["s/a"]["passed"] and rows["s/b"]["passed"]
    assert 0 <= rows["s/a"]["nsfw"] < 0.3 and 0 <= rows["s/b"]["nsfw"] < 0.3
    assert rows["s/c"]["reasons"] == ["error:nsfw"] and rows["s/c"]["nsfw"] is None
    assert rows["s/d"]["reasons"] == ["min_side"] and rows["s/d"]["nsfw"] is None  # never loaded


def test_nsfw_without_an_image_loader_is_a_configuration_error(
    make_index: Callable[[list[dict]], pl.DataFrame]
) -> None:
    with pytest.raises(ValueError, match="nsfw=True needs load_image"):
        run_prefilter(make_index([{"caption": "a calm lake at dawn"}]), PrefilterConfig(nsfw=True))
