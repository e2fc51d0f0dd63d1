"""The held-out labelled generator and the fit/report split of the detector benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.synth.copyset import FitSetError, check_report_set, verified_detector
from dedup_assets.synth.heldout import HELDOUT_EDITS, HELDOUT_KINDS, MAX_CROP_OVERLAP, heldout_bases, make_heldout_set


def test_report_on_a_fit_seed_is_refused() -> None:
    for seed in (1, 2, 3, 5, 11):
        with pytest.raises(FitSetError, match=f"seed {seed}"):
            check_report_set("A", seed)
    check_report_set("A", 4)
    check_report_set("B", 1)  # nothing was fitted on the held-out generator


def test_heldout_set_is_deterministic_and_labelled() -> None:
    a, b = make_heldout_set(14, 3, seed=5), make_heldout_set(14, 3, seed=5)
    assert len(a.images) == 14 * 4
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert set(a.kinds) <= set(HELDOUT_KINDS) and {"photo_full", "text_card", "clock"} <= set(a.kinds)
    assert {op for ops in a.ops for op in ops} <= set(HELDOUT_EDITS)
    assert all(len(ops) in (2, 3) for c, ops in enumerate(a.ops) if c % 4 == 3)  # every third copy


def test_photo_crop_bases_overlap_little(monkeypatch: pytest.MonkeyPatch) -> None:
    from dedup_assets.synth import heldout

    boxes: list = []
    real = heldout._photo_crop

    def spy(rng, photos, taken):  # noqa: ANN001, ANN202
        out = real(rng, photos, taken)
        boxes[:] = [(p, box) for p, bs in taken.items() for box in bs]
        return out

    monkeypatch.setattr(heldout, "_photo_crop", spy)
    heldout_bases(70, seed=3)
    assert len(boxes) >= 6
    for i, (p, (y, x, h, w)) in enumerate(boxes):
        for q, (y2, x2, h2, w2) in boxes[i + 1:]:
            if p == q:
                inter = max(0, min(y + h, y2 + h2) - max(y, y2)) * max(0, min(x + w, x2 + w2) - max(x, x2))
                assert inter <= MAX_CROP_OVERLAP * min(h * w, h2 * w2) + 1e-9


def test_verified_detector_scores_a_perfect_and_a_useless_embedding() -> None:
    cs = make_heldout_set(7, 2, seed=2)
    onehot = np.eye(int(cs.origin.max()) + 1, dtype=np.float32)[cs.origin]  # sims 1 within a base, 0 across
    r = verified_detector(cs, onehot, tau=0.9, margin=0.0)
    assert r["candidates"] == sum(2 * 3 // 2 for _ in range(7))  # 3 pairs per base
    assert r["precision"] == 1.0 and r["recall"] >= 0.5  # the verifier keeps what it can confirm
    # every pair at cosine 1, below a τ of 1.01 but within the margin: only the verifier decides
    flat = np.ones((len(cs.images), 4), np.float32) / 2
    f = verified_detector(cs, flat, tau=1.01, margin=0.1)
    assert f["candidates"] == len(cs.images) * (len(cs.images) - 1) // 2
    assert f["precision"] >= 0.9 and f["recall"] >= 0.5
