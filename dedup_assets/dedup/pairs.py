"""Exact cosine pair search inside clusters, the union over clusterings, and the brute-force baseline.

Grain: a `Pairs` holds one entry per unordered pair of row indices (i < j) of the embedding
matrix `x` ((n, d) float32, unit-norm rows) whose cosine is at least the threshold.

The search is exact within its scope: every pair that shares a cluster is compared with a
dot product by `kernels.block_pairs`, one cluster per call, in blocks of at most `block_size` ×
`block_size` so that a huge cluster never materializes its full similarity matrix. On a CUDA
GPU the blocks are fp16 GEMMs re-scored in float32 near τ (same pairs as the CPU); otherwise
numpy's BLAS does the work (all cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dedup_assets.dedup.kernels import block_comparisons, block_pairs, check_search_args, resolve_device
from dedup_assets.dedup.kmeans import _as_matrix  # one validation of (n, d) float32 input for both

__all__ = [
    "Pairs",
    "band_keep",
    "brute_force_pairs",
    "pairs_within_clusters",
    "union_pairs",
]


@dataclass
class Pairs:
    """Candidate duplicate pairs: parallel arrays, sorted by (i, j), each pair at most once."""

    i: np.ndarray  # int64 row index, i < j
    j: np.ndarray  # int64 row index
    sim: np.ndarray  # float32 cosine
    found_by: np.ndarray  # uint8 bitmask: bit c set if clustering c found the pair (0 for brute force)
    comparisons: int  # dot products computed to find them

    def __len__(self) -> int:
        return int(self.i.shape[0])

    @classmethod
    def empty(cls, comparisons: int = 0) -> "Pairs":
        return cls(
            i=np.zeros(0, np.int64),
            j=np.zeros(0, np.int64),
            sim=np.zeros(0, np.float32),
            found_by=np.zeros(0, np.uint8),
            comparisons=int(comparisons),
        )


def _cluster_members(labels: np.ndarray, labels2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by cluster: (rows sorted by (cluster, row), start offsets, end offsets).

    With a second assignment a row belongs to both clusters (once when they coincide).
    """
    n = labels.shape[0]
    rows = np.arange(n, dtype=np.int64)
    labs = labels.astype(np.int64)
    if labels2 is not None:
        extra = (labels2 >= 0) & (labels2 != labels)
        rows = np.concatenate([rows, rows[extra]])
        labs = np.concatenate([labs, labels2[extra].astype(np.int64)])
    order = np.lexsort((rows, labs))
    rows, labs = rows[order], labs[order]
    if rows.size == 0:
        return rows, np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(labs)) + 1
    starts = np.concatenate([[0], cut]).astype(np.int64)
    ends = np.concatenate([cut, [rows.size]]).astype(np.int64)
    return rows, starts, ends


def _search(x: np.ndarray, members: np.ndarray | None, threshold: float, block_size: int, device: str, out: list) -> int:
    """All pairs ≥ threshold among `members` (ascending row ids; None = every row), appended to
    `out` as (i, j, sim) in row ids of x; returns the dot products computed."""
    rows = x if members is None else x[members]
    i, j, sim = block_pairs(rows, None, threshold, device=device, block_size=block_size)
    if i.size:
        out.append((i, j, sim) if members is None else (members[i], members[j], sim))
    return block_comparisons(rows.shape[0], None, block_size)


def _concat(out: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([part[k] for part in out]) for k in range(3))  # type: ignore[return-value]


def _sorted_pairs(i: np.ndarray, j: np.ndarray, sim: np.ndarray, found_by: np.ndarray, comparisons: int) -> Pairs:
    order = np.lexsort((j, i))
    return Pairs(i=i[order], j=j[order], sim=sim[order], found_by=found_by[order], comparisons=int(comparisons))


def pairs_within_clusters(
    x: np.ndarray,
    labels: np.ndarray,
    labels2: np.ndarray | None = None,
    threshold: float = 0.9,
    block_size: int = 4096,
    device: str = "auto",
    clustering_index: int = 0,
) -> Pairs:
    """Every pair with cosine ≥ threshold among rows that share a cluster of one clustering.

    With `labels2` (soft assignment) a row belongs to its first and its second cluster, and a
    pair is compared when the two rows share either; a pair that shares two clusters is reported
    once. Peak extra memory: one cluster's rows of x (copied for `block_pairs`) plus block_size²
    similarities. `comparisons` counts the dot products computed (diagonal blocks are computed
    in full, `kernels.block_comparisons`).
    """
    x = _as_matrix(x)
    n = x.shape[0]
    check_search_args(threshold, block_size)
    if not 0 <= clustering_index < 8:
        raise ValueError(f"clustering_index must be in 0..7 (one bit of found_by), got {clustering_index}")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if labels2 is not None:
        labels2 = np.asarray(labels2)
        if labels2.shape != (n,):
            raise ValueError(f"labels2 must have shape ({n},) or be None, got {labels2.shape}")
    rows, starts, ends = _cluster_members(labels, labels2)
    resolved = resolve_device(device)
    out: list = []
    comparisons = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s >= 2:
            comparisons += _search(x, rows[s:e], threshold, block_size, resolved, out)
    i, j, sim = _concat(out)
    if labels2 is not None and i.size:
        # A pair whose rows share both their clusters was compared twice; keep one copy (the
        # two similarities are the same dot product, equal up to float rounding).
        key = i * n + j
        _, first = np.unique(key, return_index=True)
        i, j, sim = i[first], j[first], sim[first]
    found_by = np.full(i.shape[0], 1 << clustering_index, dtype=np.uint8)
    return _sorted_pairs(i, j, sim, found_by, comparisons)


def union_pairs(per_clustering: Sequence[Pairs]) -> Pairs:
    """Union of pair sets: each pair once, found_by bits ORed, comparisons summed."""
    parts = list(per_clustering)
    comparisons = int(sum(p.comparisons for p in parts))
    if not parts:
        return Pairs.empty()
    i = np.concatenate([p.i for p in parts]).astype(np.int64, copy=False)
    j = np.concatenate([p.j for p in parts]).astype(np.int64, copy=False)
    if i.size == 0:
        return Pairs.empty(comparisons)
    sim = np.concatenate([p.sim for p in parts]).astype(np.float32, copy=False)
    fb = np.concatenate([p.found_by for p in parts]).astype(np.uint8, copy=False)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((hi, lo))
    lo, hi, sim, fb = lo[order], hi[order], sim[order], fb[order]
    new = np.ones(lo.size, dtype=bool)
    new[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    starts = np.flatnonzero(new)
    return Pairs(
        i=lo[starts],
        j=hi[starts],
        sim=sim[starts],
        found_by=np.bitwise_or.reduceat(fb, starts).astype(np.uint8),
        comparisons=comparisons,
    )


def brute_force_pairs(x: np.ndarray, threshold: float, block_size: int = 4096, device: str = "auto") -> Pairs:
    """Every pair with cosine ≥ threshold over all n(n-1)/2 pairs (the exact baseline)."""
    x = _as_matrix(x)
    check_search_args(threshold, block_size)
    out: list = []
    comparisons = _search(x, None, threshold, block_size, resolve_device(device), out) if x.shape[0] >= 2 else 0
    i, j, sim = _concat(out)
    return _sorted_pairs(i, j, sim, np.zeros(i.shape[0], np.uint8), comparisons)


def band_keep(i: np.ndarray, j: np.ndarray, sim: np.ndarray, hi: float, k: int, ends: str = "both") -> np.ndarray:
    """Which pairs to keep when the search reaches below `hi` into a band: every pair ≥ hi, and a
    pair in the band (< hi) only when it is among the k most similar band pairs of i or of j
    (`ends="i"`: of i only — the incremental search ranks the new images' pairs only).

    Each image keeps k band pairs of its own, so the band's pairs number at most k·n per scope
    searched (one cluster of n images; 2·k per image on average, more for a hub that is in many
    others' top k): a recall-oriented search far below τ costs in proportion to N rather than to the
    density of the band. Ties rank by the other end's index (deterministic). k = 0 keeps no band pair."""
    i, j, sim = np.asarray(i), np.asarray(j), np.asarray(sim)
    keep = sim >= hi
    band = np.flatnonzero(~keep)
    if k <= 0 or band.size == 0:
        return keep
    if ends == "i":
        ends_, other, s, which = i[band], j[band], sim[band], band
    else:
        ends_ = np.concatenate([i[band], j[band]])
        other = np.concatenate([j[band], i[band]])
        s = np.concatenate([sim[band], sim[band]])
        which = np.concatenate([band, band])
    ends = ends_
    order = np.lexsort((other, -s, ends))  # by end, then most similar first
    ends_sorted = ends[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = ends_sorted[1:] != ends_sorted[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
    rank = np.arange(order.size) - start
    keep[which[order[rank < k]]] = True
    return keep
