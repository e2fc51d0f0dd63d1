"""Filter classifiers built from a few labelled examples and improved with human feedback (the seed:
OpenAI trained e.g. its violence and sexual-content filters this way, biased toward removal).

A label set (e.g. "violence") is a handful of image ids marked positive (remove) or negative. On the
embeddings of those images a logistic regression is fitted; its decision threshold is chosen on
cross-validated scores so that the held-out recall of positives reaches `target_recall` (default
0.95: biased toward removal), and the precision it costs at that threshold is reported. Every image
is then scored; the ones at or above the threshold are removed as `filter:classifier:<set>`.

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

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.coef + self.intercept


MIN_LABELS = 4  # per class


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
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x[train], y[train])
        held_out[test] = clf.decision_function(x[test])
    s_pos = np.sort(held_out[y])
    # the largest threshold that keeps ≥ target_recall of the held-out positives at or above it
    k = int(np.floor((1 - target_recall) * pos + 1e-9))
    threshold = float(s_pos[min(k, pos - 1)])
    flagged = held_out >= threshold
    recall = float((flagged & y).sum() / pos)
    precision = float((flagged & y).sum() / max(int(flagged.sum()), 1))
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x, y)
    return FilterClassifier(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), threshold, recall, precision,
                            pos, neg, folds)


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
