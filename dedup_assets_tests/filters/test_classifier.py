"""Filter classifiers from a few labels: held-out recall, the threshold rule, the uncertainty queue."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.filters.classifier import UncertaintyQueue, fit_filter_classifier


def _category(n: int, d: int = 32, seed: int = 0, share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors; a `share` of them lean toward one direction (the category to remove)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).standard_normal(d)
    y = rng.random(n) < share
    x = rng.standard_normal((n, d)) + np.where(y[:, None], 2.0 * direction / np.linalg.norm(direction), 0.0) * 1.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_a_few_dozen_labels_give_a_classifier_that_finds_the_held_out_positives() -> None:
    x, y = _category(4000, seed=1)
    pos, neg = np.flatnonzero(y)[:20], np.flatnonzero(~y)[:20]
    idx = np.r_[pos, neg]
    clf = fit_filter_classifier(x[idx], y[idx], target_recall=0.95)
    assert clf.positives == clf.negatives == 20 and clf.folds == 5 and clf.cv_recall >= 0.95
    rest = np.setdiff1d(np.arange(len(y)), idx)
    removed = clf.score(x[rest]) >= clf.threshold
    recall = (removed & y[rest]).sum() / y[rest].sum()
    precision = (removed & y[rest]).sum() / max(removed.sum(), 1)
    assert recall >= 0.85 and precision >= 0.5, (recall, precision)  # biased toward removal, yet useful


def test_too_few_labels_are_refused() -> None:
    x, y = _category(100, seed=2)
    idx = np.r_[np.flatnonzero(y)[:3], np.flatnonzero(~y)[:10]]
    with pytest.raises(ValueError, match="at least 4 positive"):
        fit_filter_classifier(x[idx], y[idx])


def test_the_queue_prefers_borderline_images_and_skips_near_copies() -> None:
    x, y = _category(3000, seed=3)
    idx = np.r_[np.flatnonzero(y)[:10], np.flatnonzero(~y)[:10]]
    clf = fit_filter_classifier(x[idx], y[idx])
    ids = [f"s/{i}" for i in range(len(y))]
    q = UncertaintyQueue(clf.threshold, pool=200)
    labelled = {ids[i] for i in idx}
    for start in range(0, len(ids), 700):  # streamed in batches, the pool stays bounded
        sl = slice(start, start + 700)
        q.add(ids[sl], clf.score(x[sl]), x[sl], labelled)
        assert len(q.ids) <= 200
    picked = q.next(20)
    assert len(picked) == 20 and not {i for i, _ in picked} & labelled
    margin = np.abs(np.array([s for _, s in picked]) - clf.threshold)
    everyone = np.abs(clf.score(x) - clf.threshold)
    assert margin.max() <= np.quantile(everyone, 0.2)  # among the 20 % most uncertain of all images
    dup = UncertaintyQueue(clf.threshold)
    dup.add(["a", "b", "c"], np.array([clf.threshold] * 3), np.stack([x[0], x[0], x[1]]), set())
    assert [i for i, _ in dup.next(3)] == ["a", "c"]  # "b" is a copy of "a"


def test_probabilities_are_calibrated_on_held_out_images_of_the_labelled_mix() -> None:
    from dedup_assets.filters.classifier import _sigmoid, expected_calibration_error

    x, y = _category(20_000, seed=4, share=0.5)
    idx = np.r_[np.flatnonzero(y)[:30], np.flatnonzero(~y)[:30]]
    clf = fit_filter_classifier(x[idx], y[idx])
    rest = np.setdiff1d(np.arange(len(y)), idx)
    s = clf.score(x[rest])
    p = clf.probability(s)
    assert clf.platt[0] > 0  # a higher score is a higher probability
    brier, brier_raw = float(np.mean((p - y[rest]) ** 2)), float(np.mean((_sigmoid(s) - y[rest]) ** 2))
    ece = expected_calibration_error(p, y[rest])
    assert brier < brier_raw and ece < 0.08, (brier, brier_raw, ece)  # the raw scores are no probabilities
    assert np.isfinite(clf.cv_brier) and clf.cv_brier < clf.cv_brier_uncalibrated and 0 <= clf.cv_ece < 0.3
