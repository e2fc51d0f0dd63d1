"""Known answers for the labelled-set metrics that the offline embedder's benchmark and fit rely on."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.synth.copyset import (
    CopySet,
    best_recall_at_precision,
    pair_precision_recall,
    per_transform_precision_recall,
    recall_at_precision,
)


def _unit_angles(degrees: list[float]) -> np.ndarray:
    a = np.radians(degrees)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# two bases (rows 0 and 3), each with two copies; the crop copy of base 1 (row 4) lies closer to
# base 0 than to its own base, the flip copies sit on their bases
EMB = _unit_angles([0.0, 5.0, 0.0, 90.0, 10.0, 90.0])
CS = CopySet(images=[], origin=np.array([0, 0, 0, 1, 1, 1]), kinds=["photo"] * 6,
             ops=[[], ["crop"], ["flip"], [], ["crop"], ["flip"]])


def test_pair_metrics_known_answer() -> None:
    # cos ≥ 0.98 (within ~11°): pairs (0,1) (0,2) (1,2) (3,5) true; (0,4) (1,4) (2,4) false
    p, r = pair_precision_recall(EMB, CS.origin, 0.98)
    assert p == pytest.approx(4 / 7) and r == pytest.approx(4 / 6)
    best, tau = best_recall_at_precision(EMB, CS.origin, 0.95)
    # sorted: 1.0 (0,2), 1.0 (3,5), cos5 (0,1), cos5 (1,2), cos5 (1,4), cos10 (0,4), cos10 (2,4), ...
    # precision stays 1 down to cos 5° only if (1,4) is not tied there: it is (5° apart), so the cut
    # at cos 5° admits 4 true and 1 false → 0.8; the best cut at precision ≥ 0.95 is cos 0° → 2/6
    assert best == pytest.approx(2 / 6) and tau == pytest.approx(1.0)
    sims = np.array([0.9, 0.8, 0.8, 0.1])
    truth = np.array([True, True, False, False])
    assert recall_at_precision(sims, truth, 0.95) == pytest.approx((0.5, 0.9))  # the tie at 0.8 goes in whole
    assert recall_at_precision(sims, truth, 0.6) == pytest.approx((1.0, 0.8))


def test_per_transform_precision_recall_counts_every_pair_of_a_copy() -> None:
    out = per_transform_precision_recall(EMB, CS, 0.98)
    # crop copies: row 1 → (0,1) (1,2) true, (1,4) false; row 4 → (0,4) (2,4) (1,4) false, and its
    # true pairs (3,4) (4,5) are missed: 6 predicted, 2 right, of 4 true pairs (counted per copy)
    assert out["crop"] == pytest.approx((2 / 6, 2 / 4))
    # flip copies: row 2 → (0,2) (1,2) true, (2,4) false; row 5 → (3,5) true, (4,5) missed
    assert out["flip"] == pytest.approx((3 / 4, 3 / 4))
