"""Incremental deduplication: new images against an existing corpus, without refitting k-means.

Grain: the same `Pairs` as the full search, restricted to pairs in which at least one image is
new. The caller assigns the new vectors to the stored centroids of each clustering
(`kmeans.assign`), then calls `pairs_with_new` per clustering and `union_pairs` over them; old
pairs stay as they were, and groups are rebuilt from old + new pairs (cheap), so a new image can
join an old group and the keeper policy decides whether it displaces the old keeper.

Cost: for every cluster that holds new images, |new in cluster| × |cluster| dot products, i.e.
about n_new · n / K per clustering instead of n² / K for a full search.

When to refit instead (`needs_refit`): the stored centroids were fitted on the corpus as it was;
once it has grown by a large factor, clusters grow unbalanced and the search slows down, so a
full refit is an explicit action taken when the corpus exceeds `refit_factor` × its size at fit.
"""

from __future__ import annotations

import numpy as np

from dedup_assets.dedup.kernels import block_comparisons, block_pairs
from dedup_assets.dedup.pairs import Pairs

__all__ = ["needs_refit", "pairs_with_new"]


def needs_refit(n_now: int, n_at_fit: int, refit_factor: float) -> bool:
    """True when the corpus grew past refit_factor × its size when the centroids were fitted."""
    if refit_factor < 1.0:
        raise ValueError(f"refit_factor must be >= 1 (e.g. 2.0 = refit when the corpus doubles), got {refit_factor}")
    return n_at_fit <= 0 or n_now > refit_factor * n_at_fit


def pairs_with_new(
    x: np.ndarray,
    labels: np.ndarray,
    labels2: np.ndarray | None,
    is_new: np.ndarray,
    threshold: float,
    block_size: int = 4096,
    clustering_index: int = 0,
    device: str = "cpu",
) -> Pairs:
    """Every pair with cosine ≥ threshold that shares a cluster and involves at least one new row.

    x: (n, d) unit rows; labels/labels2: cluster of every row (old and new); is_new: (n,) bool.
    Pairs come back with i < j, unique, found_by = 1 << clustering_index. Each cluster is one
    `kernels.block_pairs` call (its new rows against all its rows, on `device`): memory per step
    is one cluster's rows plus block_size² similarities.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    is_new = np.asarray(is_new, dtype=bool)
    if is_new.shape != (n,):
        raise ValueError(f"is_new must have shape ({n},), got {is_new.shape}")
    if not 0 <= clustering_index < 8:
        raise ValueError(f"clustering_index must be in 0..7, got {clustering_index}")
    rows = np.arange(n, dtype=np.int64)
    member_rows = [rows] + ([rows] if labels2 is not None else [])
    member_labels = [np.asarray(labels, dtype=np.int64)] + (
        [np.asarray(labels2, dtype=np.int64)] if labels2 is not None else []
    )
    all_rows = np.concatenate(member_rows)
    all_labels = np.concatenate(member_labels)
    keep = all_labels >= 0
    all_rows, all_labels = all_rows[keep], all_labels[keep]
    order = np.lexsort((all_rows, all_labels))
    all_rows, all_labels = all_rows[order], all_labels[order]
    bounds = np.flatnonzero(np.diff(all_labels)) + 1
    starts = np.concatenate([[0], bounds]) if all_rows.size else np.zeros(0, np.int64)
    ends = np.concatenate([bounds, [all_rows.size]]) if all_rows.size else np.zeros(0, np.int64)

    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    comparisons = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        members = np.unique(all_rows[s:e])
        new_members = members[is_new[members]]
        if new_members.size == 0 or members.size < 2:
            continue
        qi, mj, sv = block_pairs(x[new_members], x[members], threshold, device=device, block_size=block_size)
        comparisons += block_comparisons(new_members.size, members.size, block_size)
        a, c = new_members[qi], members[mj]
        ok = a != c
        a, c, sv = a[ok], c[ok], sv[ok]
        out_i.append(np.minimum(a, c))
        out_j.append(np.maximum(a, c))
        out_s.append(sv)
    if not out_i:
        return Pairs(
            i=np.zeros(0, np.int64), j=np.zeros(0, np.int64), sim=np.zeros(0, np.float32),
            found_by=np.zeros(0, np.uint8), comparisons=int(comparisons),
        )
    i = np.concatenate(out_i)
    j = np.concatenate(out_j)
    sim = np.concatenate(out_s)
    key = i * n + j
    _, first = np.unique(key, return_index=True)  # a new-new pair is seen from both sides
    i, j, sim = i[first], j[first], sim[first]
    order = np.lexsort((j, i))
    return Pairs(
        i=i[order], j=j[order], sim=sim[order],
        found_by=np.full(order.size, 1 << clustering_index, dtype=np.uint8), comparisons=int(comparisons),
    )
