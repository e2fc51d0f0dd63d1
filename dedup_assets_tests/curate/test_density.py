"""Density-ratio reweighting (the seed's classifier): a filter that removes cats more than dogs."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.curate.density import fit_density_ratio, log_ratio_histogram, scale_from_histogram


def _cats_and_dogs(n: int = 4000, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cat, dog = rng.standard_normal(d), rng.standard_normal(d)
    is_cat = rng.random(n) < 0.5
    x = np.where(is_cat[:, None], cat, dog) + 0.8 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kept = np.where(is_cat, rng.random(n) < 0.2, rng.random(n) < 0.8)  # the filter keeps 20 % of cats, 80 % of dogs
    return x.astype(np.float32), is_cat, kept


def test_weights_restore_the_cat_share_and_the_held_out_auc_falls_to_a_half() -> None:
    x, is_cat, kept = _cats_and_dogs()
    model = fit_density_ratio(x, kept, seed=1)
    assert model.auc_unweighted > 0.6  # the cut is visible
    assert abs(model.auc_weighted - 0.5) < 0.05  # and undone by the weights
    ratio = np.exp(model.log_ratio(x[kept]))
    s = scale_from_histogram(log_ratio_histogram(np.log(ratio)), 0.1, 10.0)
    w = np.clip(s * ratio, 0.1, 10.0)
    assert abs(w.mean() - 1.0) < 1e-3 and w.min() >= 0.1 and w.max() <= 10.0
    share_before = is_cat.mean()
    share_kept = is_cat[kept].mean()
    share_weighted = (w * is_cat[kept]).sum() / w.sum()
    assert share_kept < 0.25 < 0.4 < share_weighted  # 0.2 unweighted; weighted close to the 0.5 before
    assert abs(share_weighted - share_before) < 0.08


def test_histogram_scale_matches_the_exact_one() -> None:
    from dedup_assets.curate.reweight import _solve_scale

    ratio = np.exp(np.random.default_rng(3).normal(0, 1.5, 20_000))
    exact = _solve_scale(ratio, np.ones_like(ratio), 0.2, 5.0)
    hist = log_ratio_histogram(np.log(ratio[:10_000]))
    for k, v in log_ratio_histogram(np.log(ratio[10_000:])).items():  # summed over two batches
        hist[k] = hist.get(k, 0) + v
    assert abs(scale_from_histogram(hist, 0.2, 5.0) / exact - 1) < 1e-3


def test_too_few_or_mismatched_vectors_are_refused() -> None:
    x = np.eye(4, 8, dtype=np.float32)
    with pytest.raises(ValueError, match="too few"):
        fit_density_ratio(x, np.ones(4, bool))
    with pytest.raises(ValueError, match="one flag per row"):
        fit_density_ratio(np.zeros((50, 8)), np.zeros(40, bool))
