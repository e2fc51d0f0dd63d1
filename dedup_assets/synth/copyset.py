"""Labelled near-copy sets and their pair precision / recall (tests and benchmarks).

Grain: one image per row; `origin` is the base it derives from, so two images are a true
duplicate pair exactly when they share an origin.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dedup_assets.synth.bases import make_base_images
from dedup_assets.synth.transforms import TRANSFORMS, random_copy


@dataclass
class CopySet:
    """A labelled near-copy set: one row per image; bases carry ops == []."""

    images: list[Image.Image]
    origin: np.ndarray  # base index per image
    kinds: list[str]
    ops: list[list[str]]  # [] for the base itself


def make_copy_set(n_bases: int, copies_per_base: int, seed: int = 0, combos: bool = True) -> CopySet:
    """Each base, then copies_per_base copies: single transformations, and 2–3-op combinations."""
    rng = np.random.default_rng(seed)
    images, origin, kinds, ops = [], [], [], []
    names = list(TRANSFORMS)
    for b, (kind, img) in enumerate(make_base_images(n_bases, seed=seed)):
        images.append(img)
        origin.append(b)
        kinds.append(kind)
        ops.append([])
        for c in range(copies_per_base):
            if combos and c % 3 == 2:
                copy, applied = random_copy(img, rng, int(rng.integers(2, 4)))
            else:
                name = names[(b * copies_per_base + c) % len(names)]
                copy, applied = TRANSFORMS[name](img, rng).convert("RGB"), [name]
            images.append(copy)
            origin.append(b)
            kinds.append(kind)
            ops.append(applied)
    return CopySet(images, np.asarray(origin), kinds, ops)


def pair_precision_recall(emb: np.ndarray, origin: np.ndarray, threshold: float) -> tuple[float, float]:
    """Precision and recall of 'cosine ≥ threshold' over all pairs of the set."""
    sims = emb @ emb.T
    iu = np.triu_indices(len(origin), 1)
    pred = sims[iu] >= threshold
    truth = origin[iu[0]] == origin[iu[1]]
    tp = int((pred & truth).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    return precision, recall


def best_recall_at_precision(emb: np.ndarray, origin: np.ndarray, min_precision: float = 0.95) -> tuple[float, float]:
    """(highest recall with precision ≥ min_precision, the threshold that gives it)."""
    iu = np.triu_indices(len(origin), 1)
    return recall_at_precision((emb @ emb.T)[iu], origin[iu[0]] == origin[iu[1]], min_precision)


def recall_at_precision(sims: np.ndarray, truth: np.ndarray, min_precision: float = 0.95) -> tuple[float, float]:
    """The same over flat arrays: one similarity and one true/false label per pair."""
    order = np.argsort(-sims, kind="stable")
    tp = np.cumsum(truth[order])
    fp = np.cumsum(~truth[order])
    prec = tp / np.maximum(tp + fp, 1)
    # only cut between distinct values: a threshold admits every pair tied with it
    sorted_s = sims[order]
    cut = np.append(sorted_s[:-1] > sorted_s[1:], True)
    ok = np.flatnonzero((prec >= min_precision) & cut)
    if ok.size == 0:
        return 0.0, 1.0
    i = ok.max()
    return float(tp[i] / max(truth.sum(), 1)), float(sorted_s[i])


def transform_key(ops: list[str]) -> str:
    """How a copy is reported: its transformation, or 'combo2'/'combo3' for combinations."""
    return ops[0] if len(ops) == 1 else f"combo{len(ops)}"


def per_transform_recall(emb: np.ndarray, cs: CopySet, threshold: float) -> dict[str, float]:
    """Recall of (base, copy) pairs by transformation ('combo2'/'combo3' for combinations)."""
    base_row = {int(o): i for i, (o, op) in enumerate(zip(cs.origin, cs.ops)) if not op}
    hits: dict[str, list[bool]] = defaultdict(list)
    for i, (o, op) in enumerate(zip(cs.origin, cs.ops)):
        if not op:
            continue
        key = transform_key(op)
        hits[key].append(float(emb[i] @ emb[base_row[int(o)]]) >= threshold)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def per_transform_precision_recall(emb: np.ndarray, cs: CopySet, threshold: float) -> dict[str, tuple[float, float]]:
    """(precision, recall) of 'cosine ≥ threshold' over all pairs in which one image is a copy made
    by the transformation ('combo2'/'combo3' for combinations): its base, its sibling copies and
    every other image of the set."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, op in enumerate(cs.ops):
        if op:
            rows[transform_key(op)].append(i)
    out = {}
    for key, idx in sorted(rows.items()):
        pred = sims[idx] >= threshold
        truth = cs.origin[idx][:, None] == cs.origin[None, :]
        np.put_along_axis(truth, np.asarray(idx)[:, None], False, axis=1)
        tp = int((pred & truth).sum())
        out[key] = (tp / max(int(pred.sum()), 1), tp / max(int(truth.sum()), 1))
    return out


# What was fitted on which labelled sets: reports must come from other sets (`check_report_set`).
# Generator "A" = make_copy_set (PIL bases and edits); "B" = synth.heldout.make_heldout_set.
FIT_SETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "offline embedder (weights seeds 1, 3, 5; threshold seed 2)": ("A", (1, 2, 3, 5)),
    "verifier thresholds (dedup.verify, tuned by hand)": ("A", (11,)),
}


class FitSetError(ValueError):
    """A report was asked for on a labelled set that something was fitted on."""


def check_report_set(generator: str, seed: int) -> None:
    """Raise FitSetError when (generator, seed) is a set that a weight or threshold was fitted on."""
    for what, (gen, seeds) in FIT_SETS.items():
        if gen == generator and int(seed) in seeds:
            raise FitSetError(f"generator {generator} seed {seed} was used to fit the {what}: report on another seed")


def verified_detector(
    cs: CopySet,
    emb: np.ndarray,
    tau: float,
    margin: float,
    notion: str = "copy",
    features: list | None = None,
    band: tuple[float, int] | None = None,
) -> dict:
    """The whole detector on a labelled set: candidates = pairs with cosine ≥ τ − margin, plus with
    `band` = (band_margin, k) each image's k most similar pairs down to τ − band_margin
    (`dedup.pairs.band_keep`, as the pair search does per cluster), each verified (dedup.verify); a
    pair is predicted a duplicate when accepted, or undecided and ≥ τ.
    Returns precision, recall, candidates, per-edit and per-kind recall of (base, copy) pairs, and
    the verifier's speed. `features` (one per image) may be passed to reuse keypoints."""
    import time

    from dedup_assets.dedup.verify import VerifyConfig, extract_features, verify_pair

    cfg = VerifyConfig(notion=notion)
    t0 = time.perf_counter()
    feats = features if features is not None else [extract_features(im, cfg) for im in cs.images]
    t_feat = time.perf_counter() - t0
    n = len(cs.images)
    sims = emb @ emb.T
    iu = np.triu_indices(n, 1)
    s = sims[iu]
    truth = cs.origin[iu[0]] == cs.origin[iu[1]]
    if band is None:
        cand = np.flatnonzero(s >= tau - margin)
    else:
        from dedup_assets.dedup.pairs import band_keep

        low = np.flatnonzero(s >= tau - band[0])
        cand = low[band_keep(iu[0][low], iu[1][low], s[low], tau - margin, band[1])]
    pred = np.zeros(truth.size, bool)
    t1 = time.perf_counter()
    for k in cand.tolist():
        v = verify_pair(feats[iu[0][k]], feats[iu[1][k]], cfg)
        pred[k] = bool(v.accepted) if v.accepted is not None else bool(s[k] >= tau)
    t_ver = time.perf_counter() - t1
    tp = int((pred & truth).sum())
    per_edit: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for k in np.flatnonzero(truth).tolist():
        a, b = iu[0][k], iu[1][k]
        if cs.ops[a]:
            continue  # (base, copy) pairs only
        key = cs.ops[b][0] if len(cs.ops[b]) == 1 else f"{len(cs.ops[b])} edits"
        for d, kk in ((per_edit, key), (per_kind, cs.kinds[a])):
            d[kk][0] += int(pred[k])
            d[kk][1] += 1
    return {
        "notion": notion, "margin": margin, "band": list(band) if band else None,
        "search_threshold": tau - (band[0] if band else margin), "candidates": int(cand.size),
        "candidates_per_image": cand.size / max(n, 1),
        "precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
        "per_edit": {k: v[0] / v[1] for k, v in sorted(per_edit.items())},
        "per_kind": {k: v[0] / v[1] for k, v in sorted(per_kind.items())},
        "keypoint_images_per_s": n / max(t_feat, 1e-9) if features is None else None,
        "pairs_per_s": cand.size / max(t_ver, 1e-9), "ms_per_pair": 1000 * t_ver / max(cand.size, 1),
    }
