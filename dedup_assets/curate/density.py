"""Reweighting the way the seed did: a classifier tells pre-filter from kept images on their
embeddings, and each kept image is weighted by the density ratio p_pre(x) / p_kept(x).

The seed (DALL·E 2 pre-training mitigations): filtering removed more of some kinds of images than of
others; a classifier trained to tell the filtered set from the unfiltered one gives, for every kept
image, how under-represented its neighbourhood became, and that ratio is its loss weight. Unlike the
cluster-share weights (`reweight.cluster_weights`), it needs no categories and follows any direction
in embedding space the filter cut along.

With logistic regression on a training sample of n_pre pre-filter and n_kept kept vectors,
P(pre | x) / P(kept | x) = exp(f(x)) estimates (n_pre / n_kept) · p_pre(x) / p_kept(x), so
ratio(x) = exp(f(x)) · n_kept / n_pre. Weights are clip(s · ratio, min, max) with the one scale s
that makes their mean over the kept images exactly 1 (`reweight._solve_scale`, here over a
histogram of log ratios so that no step holds one number per image).

How well it worked is measured on a held-out part of the sample (split once, so no held-out vector
was seen in training, neither as pre-filter nor as kept): the AUC of its score
between pre-filter and kept images, unweighted (how visible the filter's cut is) and with the kept
images weighted (≈ 0.5 when the weights undo the cut). Kept images are a subset of the pre-filter
set, so even a perfect classifier's unweighted AUC stays below 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOG_BIN = 1e-4  # histogram resolution of log ratios when solving for the scale (relative error ≤ 1e-4)


@dataclass(frozen=True)
class DensityRatio:
    """A fitted pre-vs-kept classifier: ratio(x) = exp(x · coef + intercept + log(n_kept / n_pre))."""

    coef: np.ndarray  # (d,) float64
    intercept: float
    log_prior: float  # log(n_kept / n_pre) of the training sample
    auc_unweighted: float  # held out: how well the score separates pre-filter from kept images
    auc_weighted: float  # held out, kept images weighted by clip-normalized ratios (≈ 0.5 = undone)
    n_train: tuple[int, int]  # (pre, kept) training vectors
    n_test: tuple[int, int]

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.coef + self.intercept + self.log_prior


def _auc(pos: np.ndarray, neg: np.ndarray, neg_weight: np.ndarray | None = None) -> float:
    """P(score of a pre-filter vector > score of a kept vector), kept ones weighted (ties count ½)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    w = np.r_[np.ones(pos.size), np.ones(neg.size) if neg_weight is None else neg_weight]
    w = np.r_[w[: pos.size] / max(w[: pos.size].sum(), 1e-12), w[pos.size:] / max(w[pos.size:].sum(), 1e-12)]
    return float(roc_auc_score(y, np.r_[pos, neg], sample_weight=w))


def fit_density_ratio(
    x: np.ndarray, is_kept: np.ndarray, min_weight: float = 0.1, max_weight: float = 10.0,
    holdout: float = 0.3, c: float = 1.0, seed: int = 0,
) -> DensityRatio:
    """Fit on a sample of pre-filter vectors `x` ((n, d)) of which `is_kept` marks the kept ones; the
    sample is split once, so no held-out vector (as pre-filter or as kept) was seen in training."""
    from sklearn.linear_model import LogisticRegression

    from dedup_assets.curate.reweight import _solve_scale

    x, is_kept = np.asarray(x, np.float32), np.asarray(is_kept, bool)
    if x.ndim != 2 or is_kept.shape != (len(x),):
        raise ValueError(f"x must be (n, d) and is_kept one flag per row, got {x.shape} and {is_kept.shape}")
    if min(len(x), int(is_kept.sum())) < 20:
        raise ValueError(f"too few vectors to fit a density ratio: {len(x)} pre-filter, {int(is_kept.sum())} kept "
                         "(need 20 each)")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(round(len(x) * (1 - holdout))))
    train, test = np.zeros(len(x), bool), np.zeros(len(x), bool)
    train[order[:cut]], test[order[cut:]] = True, True
    pre_tr, kept_tr = x[train], x[train & is_kept]
    pre_te, kept_te = x[test], x[test & is_kept]
    if len(kept_tr) == 0:
        raise ValueError("no kept vector in the training part of the sample")
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(np.r_[pre_tr, kept_tr], np.r_[np.ones(len(pre_tr)), np.zeros(len(kept_tr))])
    model = DensityRatio(
        coef=clf.coef_[0].astype(np.float64), intercept=float(clf.intercept_[0]),
        log_prior=float(np.log(len(kept_tr) / len(pre_tr))), auc_unweighted=float("nan"),
        auc_weighted=float("nan"), n_train=(len(pre_tr), len(kept_tr)), n_test=(len(pre_te), len(kept_te)),
    )
    if len(pre_te) == 0 or len(kept_te) == 0:
        return model
    s_pre, s_kept = model.log_ratio(pre_te), model.log_ratio(kept_te)
    ratio = np.exp(s_kept)
    w = np.clip(_solve_scale(ratio, np.ones_like(ratio), min_weight, max_weight) * ratio, min_weight, max_weight)
    return DensityRatio(**{**model.__dict__, "auc_unweighted": _auc(s_pre, s_kept), "auc_weighted": _auc(s_pre, s_kept, w)})


def log_ratio_histogram(log_ratios: np.ndarray) -> dict[int, int]:
    """Counts of log ratios in bins of LOG_BIN (bin → count), to be summed over batches."""
    bins, counts = np.unique(np.round(np.asarray(log_ratios, np.float64) / LOG_BIN).astype(np.int64), return_counts=True)
    return dict(zip(bins.tolist(), counts.tolist()))


def scale_from_histogram(hist: dict[int, int], min_weight: float, max_weight: float) -> float:
    """The s with mean(clip(s · ratio)) = 1 over the kept images, from their log-ratio histogram."""
    from dedup_assets.curate.reweight import _solve_scale

    if not hist:
        return 1.0
    bins = np.fromiter(hist.keys(), np.float64)
    counts = np.fromiter(hist.values(), np.float64)
    return _solve_scale(np.exp(bins * LOG_BIN), counts, min_weight, max_weight)
