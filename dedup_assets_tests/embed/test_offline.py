"""The offline embedder: known answers, invariances, determinism, and a small labelled near-copy set."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageOps

from dedup_assets.embed.base import embed_images
from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.synth.bases import make_base_images, make_clock
from dedup_assets.synth.copyset import (
    best_recall_at_precision,
    make_copy_set,
    pair_precision_recall,
    per_transform_recall,
)
from dedup_assets.synth.transforms import TRANSFORMS

EMB = OfflineEmbedder()


def _cos(a: Image.Image, b: Image.Image) -> float:
    x = embed_images(EMB, [a, b])
    return float(x[0] @ x[1])


def test_shape_norm_determinism_and_pickling() -> None:
    imgs = [im for _, im in make_base_images(8, seed=5)]
    x = embed_images(EMB, imgs)
    assert x.shape == (8, EMB.dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    buf = io.BytesIO()
    imgs[0].save(buf, "PNG")
    same = Image.open(io.BytesIO(buf.getvalue()))
    np.testing.assert_array_equal(embed_images(EMB, [same])[0], embed_images(pickle.loads(pickle.dumps(EMB)), [imgs[0]])[0])
    assert EMB.model_id.startswith("dedup-assets/offline-")


def test_a_copy_is_closer_to_its_base_than_to_other_bases() -> None:
    bases = [im for _, im in make_base_images(24, seed=9)]
    rng = np.random.default_rng(0)
    copies = [TRANSFORMS[name](bases[i], rng) for i, name in enumerate(["jpeg", "resize", "color", "border", "crop", "grayscale"] * 4)]
    xb = embed_images(EMB, bases)
    xc = embed_images(EMB, copies)
    sims = xc @ xb.T
    assert (sims.argmax(axis=1) == np.arange(len(copies))).mean() >= 0.9


def test_invariances_flip_and_resize() -> None:
    for _, img in make_base_images(8, seed=4):
        assert _cos(img, ImageOps.mirror(img)) > 0.98
        for f in (0.5, 1.5):
            small = img.resize((int(img.width * f), int(img.height * f)), Image.Resampling.BICUBIC)
            assert _cos(img, small) >= EMB.duplicate_threshold


def test_clocks_at_different_times_are_not_copies() -> None:
    a, b = make_clock(3, 0), make_clock(7, 40)
    assert _cos(a, b) < EMB.duplicate_threshold
    assert _cos(a, TRANSFORMS["jpeg"](a, np.random.default_rng(1))) >= EMB.duplicate_threshold


def test_small_labelled_set_precision_and_recall() -> None:
    cs = make_copy_set(n_bases=60, copies_per_base=3, seed=1)
    x = embed_images(EMB, cs.images)
    precision, recall = pair_precision_recall(x, cs.origin, EMB.duplicate_threshold)
    # measured: precision 0.86, recall 0.48 on this set (the benchmark has the full picture)
    assert precision >= 0.75 and recall >= 0.40, (precision, recall)
    best, _ = best_recall_at_precision(x, cs.origin, 0.95)
    assert best >= 0.30, best
    per = per_transform_recall(x, cs, EMB.duplicate_threshold)
    for name in ("jpeg", "png", "resize", "flip", "color"):
        if name in per:
            assert per[name] >= 0.8, (name, per[name])
