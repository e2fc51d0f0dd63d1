"""How many true duplicate pairs did the clustered search find? An estimate from sampled images.

A true pair is any pair of rows with cosine ≥ threshold. We sample images uniformly, find all
of their true pairs exactly (a blocked matrix product of the sample against every row of x),
and count the fraction present among the candidate pairs. Grain of the estimate: true pairs
that touch at least one sampled image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dedup_assets.dedup.pairs import Pairs

__all__ = [
    "RecallEstimate", "StreamedRecall", "estimate_recall", "sampled_true_pairs", "streamed_recall",
    "true_pairs_of", "wilson_interval",
]

# Two float32 dot products of the same pair computed in different block shapes can differ by a
# few 1e-7; a true pair this close to the threshold that the candidates lack is a rounding tie,
# not a miss, and is left out of the count.
TIE_EPS = 1e-5
_SIM_BUDGET = 1 << 24  # similarities materialized per block (64 MB of float32)


@dataclass
class RecallEstimate:
    """Recall of the candidate pairs over the true pairs of a random sample of images.

    by_n_clusterings[c] is the recall of the pairs found by clusterings 0..c alone (pairs with
    found_by == 0, e.g. from a brute-force search, count for every prefix). With no true pair
    in the sample, recall is 1.0 (nothing was missed) and the interval is [0, 1] (nothing was
    learned); n_true_pairs = 0 tells the two apart.
    """

    recall: float
    ci_low: float
    ci_high: float
    n_sampled: int
    n_true_pairs: int
    n_found: int
    by_n_clusterings: list[float]
    threshold: float


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); [0, 1] when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def true_pairs_of(
    x: np.ndarray, queries: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine ≥ threshold that involve one of the query rows, each once."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    queries = np.unique(np.asarray(queries, dtype=np.int64))
    t = np.float32(threshold)
    qb = max(1, min(queries.size, 1024))
    cb = max(1, _SIM_BUDGET // qb)
    out_a, out_b, out_s = [], [], []
    for q0 in range(0, queries.size, qb):
        q = queries[q0 : q0 + qb]
        xq = x[q]
        for c0 in range(0, n, cb):
            s = xq @ x[c0 : c0 + cb].T
            p, r = np.nonzero(s >= t)
            if p.size:
                a, b = q[p], r.astype(np.int64) + c0
                keep = a != b
                out_a.append(a[keep])
                out_b.append(b[keep])
                out_s.append(s[p, r][keep])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * n + hi, return_index=True)  # a pair of two sampled rows shows up twice
    return lo[first], hi[first], s[first]


def recall_by_prefix(found: np.ndarray, found_by: np.ndarray, n_clusterings: int) -> list[float]:
    """Recall of the pairs found by clusterings 0..c alone, for c = 0..n_clusterings-1 (the seed's
    85 % → 97 % curve): a true pair counts for prefix c when it was found and its found_by has a
    bit below c + 1, or is 0 (found by a search that is not a clustering, e.g. brute force)."""
    n = int(found.size)
    out = []
    for c in range(1, n_clusterings + 1):
        mask = (1 << min(c, 8)) - 1
        hit = found & (((found_by & mask) != 0) | (found_by == 0))
        out.append(float(hit.sum()) / n if n else 1.0)
    return out


def estimate_recall(
    x: np.ndarray,
    candidates: Pairs,
    threshold: float,
    n_clusterings: int,
    sample_size: int = 1000,
    seed: int = 0,
) -> RecallEstimate:
    """Fraction of the true pairs of `sample_size` random images that `candidates` contains.

    Cost: sample_size × n dot products (1000 × 1,000,000 at d = 512 takes ~15 s on 2 cores).
    The interval is Wilson's on the pair count; pairs of one image are not independent, so read
    it as optimistic when a few images have very many duplicates.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D (n, d) array, got shape {x.shape}")
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    if n_clusterings < 0:
        raise ValueError(f"n_clusterings must be >= 0, got {n_clusterings}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(sample_size, n), replace=False)) if n else np.zeros(0, np.int64)
    ti, tj, ts = true_pairs_of(x, sample, threshold)

    ci = np.asarray(candidates.i, dtype=np.int64)
    cj = np.asarray(candidates.j, dtype=np.int64)
    ckey = np.minimum(ci, cj) * max(n, 1) + np.maximum(ci, cj)
    corder = np.argsort(ckey, kind="stable")
    ckey = ckey[corder]
    cfb = np.asarray(candidates.found_by, dtype=np.uint8)[corder]
    tkey = ti * max(n, 1) + tj
    pos = np.searchsorted(ckey, tkey)
    pos_ok = np.minimum(pos, max(ckey.size - 1, 0))
    present = (pos < ckey.size) & (ckey[pos_ok] == tkey) if ckey.size else np.zeros(tkey.size, dtype=bool)
    tie = ~present & (ts < np.float32(threshold + TIE_EPS))
    present, fb = present[~tie], np.where(present, cfb[pos_ok] if ckey.size else 0, 0)[~tie]

    n_true = int(present.size)
    n_found = int(present.sum())
    by_c = recall_by_prefix(present, fb.astype(np.int64), n_clusterings)
    recall = n_found / n_true if n_true else 1.0
    lo, hi = wilson_interval(n_found, n_true)
    return RecallEstimate(
        recall=float(recall),
        ci_low=float(lo),
        ci_high=float(hi),
        n_sampled=int(sample.size),
        n_true_pairs=n_true,
        n_found=n_found,
        by_n_clusterings=by_c,
        threshold=float(threshold),
    )


@dataclass
class StreamedRecall:
    """Recall of candidate pairs over the exact pairs ≥ τ of sampled images, found by streaming.

    A pair is counted when it touches a sampled image (pairs between two sampled images once),
    so every pair of the corpus has the same chance to be counted and found/true estimates the
    recall of all pairs. The interval is a bootstrap over the sampled images (resampling images,
    not pairs): misses come in clumps (a dense region the clusters cut), and a binomial interval
    on pairs would be too narrow. `dense_recall` is the recall over the pairs of the sampled
    images with the most true pairs (the top decile), where misses concentrate.
    """

    recall: float
    ci_low: float
    ci_high: float
    n_sampled: int
    n_true_pairs: int
    n_found: int
    by_n_clusterings: list[float]
    dense_recall: float
    dense_true_pairs: int
    threshold: float


def sampled_true_pairs(
    batches: Iterable[tuple[list[str], np.ndarray]],
    query_ids: Sequence[str],
    queries: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Exact partners ≥ threshold of each query over streamed (ids, vectors) batches.

    Returns (query index, partner id, cosine) for every partner other than the query itself.
    Memory: the queries plus one batch × queries similarity matrix.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t = np.float32(threshold)
    qi_parts, pid, sims = [], [], []
    qset = list(query_ids)
    for ids, x in batches:
        if x.shape[0] == 0 or q.shape[0] == 0:
            continue
        s = x @ q.T  # (batch, queries)
        r, c = np.nonzero(s >= t)
        if r.size:
            ids_arr = np.asarray(ids, dtype=object)
            other = ids_arr[r]
            qid = np.asarray(qset, dtype=object)[c]
            keep = other != qid
            qi_parts.append(c[keep].astype(np.int64))
            pid.extend(other[keep].tolist())
            sims.append(s[r, c][keep].astype(np.float32))
    if not qi_parts:
        return np.zeros(0, np.int64), [], np.zeros(0, np.float32)
    return np.concatenate(qi_parts), pid, np.concatenate(sims)


def streamed_recall(
    query_ids: Sequence[str],
    partner_q: np.ndarray,
    partner_ids: Sequence[str],
    partner_sim: np.ndarray,
    found_by: dict[tuple[str, str], int],
    threshold: float,
    n_clusterings: int,
    seed: int = 0,
    reps: int = 1000,
) -> StreamedRecall:
    """Recall from the sampled images' true partners and the candidate pairs that touch them
    (`found_by[(a, b)]` with a < b)."""
    qids = list(query_ids)
    sampled = set(qids)
    q_of, fb = [], []
    seen: set[tuple[str, str]] = set()
    for q, other, s in zip(partner_q.tolist(), partner_ids, partner_sim.tolist()):
        a, b = qids[q], other
        key = (a, b) if a < b else (b, a)
        if other in sampled:
            if key in seen:
                continue
            seen.add(key)
        bits = found_by.get(key)
        if bits is None and s < threshold + TIE_EPS:
            continue  # a rounding tie at τ, not a miss
        q_of.append(q)
        fb.append(-1 if bits is None else int(bits))
    q_of_a = np.asarray(q_of, dtype=np.int64)
    fb_a = np.asarray(fb, dtype=np.int64)
    found = fb_a >= 0
    m = len(qids)
    true_per = np.bincount(q_of_a, minlength=m).astype(np.float64)
    found_per = np.bincount(q_of_a, weights=found.astype(np.float64), minlength=m)
    n_true, n_found = int(true_per.sum()), int(found_per.sum())
    recall = n_found / n_true if n_true else 1.0
    rng = np.random.default_rng(seed)
    if n_true and m:
        draws = rng.integers(0, m, size=(reps, m))
        t_b, f_b = true_per[draws].sum(axis=1), found_per[draws].sum(axis=1)
        boot = np.where(t_b > 0, f_b / np.maximum(t_b, 1), 1.0)
        lo, hi = float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
    else:
        lo, hi = 0.0, 1.0
    by_c = recall_by_prefix(found, fb_a, n_clusterings)
    dense_q = np.argsort(-true_per)[: max(1, m // 10)] if m else np.zeros(0, np.int64)
    d_true, d_found = float(true_per[dense_q].sum()), float(found_per[dense_q].sum())
    return StreamedRecall(
        recall=float(recall), ci_low=lo, ci_high=hi, n_sampled=m, n_true_pairs=n_true, n_found=n_found,
        by_n_clusterings=by_c, dense_recall=d_found / d_true if d_true else 1.0, dense_true_pairs=int(d_true),
        threshold=float(threshold),
    )
