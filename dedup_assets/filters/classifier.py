"""Filter classifiers built from a few labelled examples and improved with human feedback (the seed:
OpenAI trained e.g. its violence and sexual-content filters this way, biased toward removal).

A label set (e.g. "violence") is a handful of image ids marked positive (remove) or negative. On the
embeddings of those images a logistic regression is fitted; its decision threshold is chosen on
cross-validated scores so that the held-out recall of positives reaches `target_recall` (default
0.95: biased toward removal), and the precision it costs at that threshold is reported. Every image
is then scored; the ones at or above the threshold are removed as `filter:classifier:<set>`.

Calibration: the logistic regression is fitted with balanced class weights, so its raw output is a
ranking, not a probability. The out-of-fold scores of the cross-validation are mapped to
probabilities by Platt scaling (a one-dimensional logistic fit, as scikit-learn's
`CalibratedClassifierCV(method="sigmoid")` does), and the calibration is itself reported
out-of-fold (Brier score and expected calibration error, each fold's images mapped by a fit on the
other folds). The probability is calibrated on the *labelled* images: it is P(positive) among images
like the labelled ones, whose class mix active learning chooses, not the share in the whole corpus.

Active learning: the next images to label are the unlabelled ones whose scores lie nearest the
threshold (uncertainty sampling), taken greedily so that no two are near-copies of each other
(cosine < `diversity`), so each round of labels teaches the classifier where it is unsure.

What it can learn depends on the embedder: on open_clip vectors a linear probe separates semantic
categories well; the offline embedder's vectors describe layout, texture and colour, so a classifier
on them learns "looks like these pictures", not "shows violence".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FilterClassifier:
    coef: np.ndarray  # (d,) float64
    intercept: float
    threshold: float  # remove when score ≥ threshold (score = decision function)
    cv_recall: float  # of positives at the threshold, cross-validated
    cv_precision: float
    positives: int
    negatives: int
    folds: int
    platt: tuple[float, float] = (1.0, 0.0)  # probability = sigmoid(a · score + b), fitted out-of-fold
    cv_brier: float = float("nan")  # of the calibrated probabilities, out-of-fold (0 is perfect)
    cv_brier_uncalibrated: float = float("nan")  # sigmoid of the raw score, for comparison
    cv_ece: float = float("nan")  # expected calibration error over 5 probability bins, out-of-fold

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.coef + self.intercept

    def probability(self, score: np.ndarray) -> np.ndarray:
        """The calibrated probability that an image with this score is a positive (see module doc)."""
        a, b = self.platt
        return _sigmoid(a * np.asarray(score, np.float64) + b)

    @property
    def threshold_probability(self) -> float:
        return float(self.probability(np.array([self.threshold]))[0])


MIN_LABELS = 4  # per class


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of P(y | s) = sigmoid(a·s + b), by Platt's method with his smoothed targets
    ((N₊ + 1)/(N₊ + 2) and 1/(N₋ + 2)), which keep a perfectly separated set from infinite slopes."""
    from scipy.optimize import minimize

    s, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        z = ab[0] * s + ab[1]
        p = _sigmoid(z)
        nll = float(np.sum(np.logaddexp(0, z) - t * z))  # −Σ t·log p + (1 − t)·log(1 − p)
        g = p - t
        return nll, np.array([float(g @ s), float(g.sum())])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 5) -> float:
    """Σ over equal-width probability bins of (bin share) · |mean probability − share positive|."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def fit_filter_classifier(x: np.ndarray, y: np.ndarray, target_recall: float = 0.95, c: float = 1.0,
                          seed: int = 0) -> FilterClassifier:
    """A logistic regression on labelled vectors (y: 1 = remove), with the threshold that reaches
    target_recall of positives on cross-validated scores (k-fold, k = min(5, labels per class))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(x, np.float32), np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if min(pos, neg) < MIN_LABELS:
        raise ValueError(f"a label set needs at least {MIN_LABELS} positive and {MIN_LABELS} negative labels, "
                         f"has {pos} and {neg}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    folds = min(5, pos, neg)
    held_out = np.empty(len(y))
    fold_of = np.empty(len(y), int)
    for f, (train, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x[train], y[train])
        held_out[test] = clf.decision_function(x[test])
        fold_of[test] = f
    # calibration, checked out-of-fold: each fold's probabilities come from a Platt fit on the others'
    p_cv = np.empty(len(y))
    for f in range(folds):
        other = fold_of != f
        if min(int(y[other].sum()), int((~y[other]).sum())) == 0:
            p_cv[~other] = y[other].mean()
            continue
        a, b = fit_platt(held_out[other], y[other])
        p_cv[~other] = _sigmoid(a * held_out[~other] + b)
    brier = float(np.mean((p_cv - y) ** 2))
    brier_raw = float(np.mean((_sigmoid(held_out) - y) ** 2))
    ece = expected_calibration_error(p_cv, y)
    s_pos = np.sort(held_out[y])
    # the largest threshold that keeps ≥ target_recall of the held-out positives at or above it
    k = int(np.floor((1 - target_recall) * pos + 1e-9))
    threshold = float(s_pos[min(k, pos - 1)])
    flagged = held_out >= threshold
    recall = float((flagged & y).sum() / pos)
    precision = float((flagged & y).sum() / max(int(flagged.sum()), 1))
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x, y)
    return FilterClassifier(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), threshold, recall, precision,
                            pos, neg, folds, platt=fit_platt(held_out, y), cv_brier=brier,
                            cv_brier_uncalibrated=brier_raw, cv_ece=ece)


@dataclass
class UncertaintyQueue:
    """The unlabelled images nearest the threshold, streamed batch by batch (bounded: `pool` kept)."""

    threshold: float
    pool: int = 2000
    ids: list[str] | None = None
    scores: np.ndarray | None = None
    vectors: np.ndarray | None = None

    def add(self, ids: list[str], scores: np.ndarray, x: np.ndarray, labelled: set[str]) -> None:
        keep = np.array([i not in labelled for i in ids], bool)
        if not keep.any():
            return
        ids = [i for i, k in zip(ids, keep) if k]
        scores, x = np.asarray(scores)[keep], np.asarray(x, np.float32)[keep]
        if self.ids is None:
            self.ids, self.scores, self.vectors = ids, scores, x
        else:
            self.ids, self.scores = self.ids + ids, np.r_[self.scores, scores]
            self.vectors = np.r_[self.vectors, x]
        if len(self.ids) > self.pool:
            order = np.argsort(np.abs(self.scores - self.threshold), kind="stable")[: self.pool]
            self.ids = [self.ids[i] for i in order]
            self.scores, self.vectors = self.scores[order], self.vectors[order]

    def next(self, k: int, diversity: float = 0.9) -> list[tuple[str, float]]:
        """Up to k (image_id, score), nearest the threshold first, no two with cosine ≥ diversity."""
        if not self.ids:
            return []
        order = np.argsort(np.abs(self.scores - self.threshold), kind="stable")
        picked: list[int] = []
        for i in order.tolist():
            if len(picked) == k:
                break
            if picked and float((self.vectors[picked] @ self.vectors[i]).max()) >= diversity:
                continue
            picked.append(i)
        return [(self.ids[i], float(self.scores[i])) for i in picked]
