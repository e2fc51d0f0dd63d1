"""Duplicate groups from candidate pairs: greedy keepers without chaining (the default), or
connected components with optional anti-chaining.

The default policy (`greedy_keepers`, used by the `duplicate_groups` asset through DuckDB in
`dedup_assets.tables.build_duplicate_groups`): images are ranked by the keeper policy; the
best-ranked image is kept and every image with a pair ≥ τ to it is removed as its duplicate;
then the best-ranked image neither kept nor removed, and so on (as SemDeDup and NeMo Curator's
semantic dedup keep one image per neighbourhood). So every removed image has cosine ≥ τ to its
keeper, and two keepers never form a pair. On a chain A≈B≈C (A not ≈ C) with A ranked first,
A and C are kept and B is removed as a duplicate of A.

Grain of `build_groups`: one row per image that belongs to a duplicate group of two or more
images. Images in no pair (or left alone after splitting) do not appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import polars as pl

from dedup_assets.dedup.pairs import Pairs

__all__ = ["GROUP_SCHEMA", "KeeperPolicy", "build_groups", "connected_components", "greedy_keepers"]

DIAMETER_EXACT_MAX = 2000  # beyond this many members the diameter is taken over a seeded sample
_CHUNK = 65_536

GROUP_SCHEMA = {
    "image_id": pl.String,
    "group_id": pl.String,
    "is_keeper": pl.Boolean,
    "similarity_to_keeper": pl.Float32,
    "group_size": pl.Int32,
    "group_min_similarity": pl.Float32,
    "group_diameter": pl.Float32,
}


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component of every row 0..n-1 given undirected edges (i[e], j[e]).

    Returns an (n,) int64 array whose value is the smallest row index in the row's component
    (so singletons map to themselves and ids are deterministic). Vectorized union-find: hook
    each edge's larger root under its smaller root, then compress paths by pointer jumping,
    until every edge joins equal roots; a handful of passes over the edges even for 1e6 pairs.
    """
    parent = np.arange(n, dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    if i.shape != j.shape:
        raise ValueError(f"i and j must have the same shape, got {i.shape} and {j.shape}")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        lo, hi = min(i.min(), j.min()), max(i.max(), j.max())
        raise ValueError(f"edge endpoints must lie in [0, {n}); got range [{lo}, {hi}]")
    while i.size:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            break
        ri, rj = ri[differ], rj[differ]
        i, j = i[differ], j[differ]  # edges already inside one component never matter again
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        # parent[x] <= x always holds, so hooking roots downward can never create a cycle.
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def greedy_keepers(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy keepers on nodes 0..n-1 ranked by their index (0 = best) joined by pairs (i, j, sim).

    Node u is kept when no better-ranked neighbour is kept; otherwise it is removed as a
    duplicate of its best-ranked kept neighbour. Returns (keeper, sim_to_keeper): keeper[u] = u
    for kept nodes (including nodes in no pair), the keeper's index for removed ones; sim is
    1.0 for kept nodes. Sequential in rank order over a CSR adjacency: O(n + pairs).
    """
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    sim = np.asarray(sim, dtype=np.float32)
    if not (i.shape == j.shape == sim.shape):
        raise ValueError("i, j and sim must be parallel arrays")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"pair endpoints must lie in [0, {n})")
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    lo, hi, sim = lo[keep], hi[keep], sim[keep]
    # each node needs only its better-ranked neighbours: CSR of hi → lo, sorted by lo
    order = np.lexsort((lo, hi))
    lo, hi, sim = lo[order], hi[order], sim[order]
    start = np.searchsorted(hi, np.arange(n + 1))
    keeper = np.arange(n, dtype=np.int64)
    out_sim = np.ones(n, dtype=np.float32)
    kept = np.ones(n, dtype=bool)
    for u in np.unique(hi).tolist():
        s, e = start[u], start[u + 1]
        nb = lo[s:e]
        hit = np.flatnonzero(kept[nb])
        if hit.size:  # neighbours are sorted by rank: the first kept one is the best
            kept[u] = False
            keeper[u] = nb[hit[0]]
            out_sim[u] = sim[s + hit[0]]
    return keeper, out_sim


@dataclass(frozen=True)
class KeeperPolicy:
    """Which member of a duplicate group is kept.

    * "resolution": largest width × height, then largest file size in bytes, then smallest
      image_id (missing sizes count as 0).
    * "centroid": the member closest (cosine) to the mean vector of its group, then smallest id.
    * "priority": highest user-given priority value (missing = lowest), then smallest id.
    """

    name: Literal["resolution", "centroid", "priority"] = "resolution"

    def __post_init__(self) -> None:
        if self.name not in ("resolution", "centroid", "priority"):
            raise ValueError(f"keeper policy must be 'resolution', 'centroid' or 'priority', got {self.name!r}")


def _column(values, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric (one value per image), got {type(values).__name__}: {e}") from e
    if a.shape != (n,):
        raise ValueError(f"{name} must have one value per image, shape ({n},), got {a.shape}")
    return a


def _group_bounds(sorted_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1
    return np.concatenate([[0], cut]).astype(np.int64), np.concatenate([cut, [sorted_groups.size]]).astype(np.int64)


def _rowwise_dot(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(a.size, dtype=np.float32)
    for s in range(0, a.size, _CHUNK):
        e = min(a.size, s + _CHUNK)
        out[s:e] = np.einsum("ij,ij->i", x[a[s:e]], x[b[s:e]])
    return out


def _group_means_dot(x: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For rows sorted by group, each row's dot product with the (unnormalized) mean of its group."""
    n_groups = starts.size
    sums = np.zeros((n_groups, x.shape[1]), dtype=np.float64)
    group_of = np.repeat(np.arange(n_groups), ends - starts)
    for s in range(0, rows.size, _CHUNK):
        e = min(rows.size, s + _CHUNK)
        g = group_of[s:e]
        seg = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1])
        sums[g[seg]] += np.add.reduceat(x[rows[s:e]].astype(np.float64), seg, axis=0)
    out = np.empty(rows.size, dtype=np.float64)
    for s in range(0, rows.size, _CHUNK):
        e = min(rows.size, s + _CHUNK)
        out[s:e] = np.einsum("ij,ij->i", x[rows[s:e]].astype(np.float64), sums[group_of[s:e]])
    return out


def _choose_keepers(
    x: np.ndarray,
    rows: np.ndarray,
    comp: np.ndarray,
    policy: KeeperPolicy,
    id_rank: np.ndarray,
    area: np.ndarray | None,
    file_bytes: np.ndarray | None,
    priority: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by group with the keeper first; returns (rows, group starts, group ends)."""
    g = comp[rows]
    order = np.lexsort((rows, g))
    rows, g = rows[order], g[order]
    starts, ends = _group_bounds(g)
    if policy.name == "resolution":
        a = np.nan_to_num(area[rows], nan=0.0) if area is not None else np.zeros(rows.size)
        fb = np.nan_to_num(file_bytes[rows], nan=0.0) if file_bytes is not None else np.zeros(rows.size)
        keys = (id_rank[rows], -fb, -a, g)
    elif policy.name == "centroid":
        keys = (id_rank[rows], -_group_means_dot(x, rows, starts, ends), g)
    else:
        if priority is None:
            raise ValueError("keeper policy 'priority' needs a priority value per image (priority=...)")
        pr = np.nan_to_num(priority[rows], nan=-np.inf)
        keys = (id_rank[rows], -pr, g)
    order = np.lexsort(keys)  # stable within each group; g (last key) keeps groups contiguous
    return rows[order], starts, ends


def _diameters(x: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, sims: np.ndarray) -> np.ndarray:
    sizes = ends - starts
    diam = np.empty(starts.size, dtype=np.float32)
    two = sizes == 2
    diam[two] = 1.0 - sims[starts[two] + 1]  # the only pair is (keeper, other)
    rng = np.random.default_rng(0)
    for g in np.flatnonzero(~two):
        members = rows[starts[g] : ends[g]]
        if members.size > DIAMETER_EXACT_MAX:
            # Sampled: a lower bound on the true diameter (the keeper is always included).
            members = np.concatenate(
                [members[:1], rng.choice(members[1:], DIAMETER_EXACT_MAX - 1, replace=False)]
            )
        xm = x[members]
        diam[g] = 1.0 - float((xm @ xm.T).min())
    return np.clip(diam, 0.0, 2.0)


def build_groups(
    x: np.ndarray,
    pairs: Pairs,
    ids: Sequence[str],
    policy: KeeperPolicy = KeeperPolicy(),
    width=None,
    height=None,
    file_bytes=None,
    priority=None,
    split_below: float | None = None,
) -> pl.DataFrame:
    """Duplicate groups (connected components of the pair graph) with one keeper each.

    One row per image in a group of two or more, sorted by (group_id, image_id), with columns
    image_id, group_id (the keeper's image_id: stable as long as the keeper is), is_keeper,
    similarity_to_keeper (1.0 for the keeper), group_size, group_min_similarity (lowest
    similarity of a member to the keeper) and group_diameter (largest 1 - cosine between two
    members; over a seeded sample of 2000 members for bigger groups, then a lower bound).

    Anti-chaining: with `split_below`, members whose similarity to their keeper is below it
    leave the group; the leavers are regrouped among themselves through the pairs that join
    two leavers, with new keepers, and so on until no member is below `split_below` (a member
    left alone is no longer a duplicate). Without it a chain A~B~C~D… stays one group however
    far its ends have drifted apart.

    `width`, `height`, `file_bytes` and `priority` are per-row arrays aligned with `ids`.
    """
    n = len(ids)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"x must have one row per id: shape ({n}, d), got {x.shape}")
    if split_below is not None and not -1.0 <= split_below <= 1.0:
        raise ValueError(f"split_below is a cosine in [-1, 1] (or None to disable), got {split_below}")
    w, h = _column(width, n, "width"), _column(height, n, "height")
    area = None if w is None and h is None else (
        (w if w is not None else np.ones(n)) * (h if h is not None else np.ones(n))
    )
    fb = _column(file_bytes, n, "file_bytes")
    pr = _column(priority, n, "priority")
    if policy.name == "priority" and pr is None:
        raise ValueError("keeper policy 'priority' needs a priority value per image (priority=...)")
    ids_arr = np.asarray(list(ids), dtype=object)
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[np.argsort(ids_arr.astype(str), kind="stable")] = np.arange(n)

    ei = np.asarray(pairs.i, dtype=np.int64)
    ej = np.asarray(pairs.j, dtype=np.int64)
    out_rows: list[np.ndarray] = []
    out_keeper: list[np.ndarray] = []
    out_sim: list[np.ndarray] = []
    while ei.size:
        comp = connected_components(n, ei, ej)
        in_edge = np.zeros(n, dtype=bool)
        in_edge[ei] = True
        in_edge[ej] = True
        rows = np.flatnonzero(in_edge)  # every row on an edge is in a component of size >= 2
        rows, starts, ends = _choose_keepers(x, rows, comp, policy, id_rank, area, fb, pr)
        keeper = np.repeat(rows[starts], ends - starts)
        sim = _rowwise_dot(x, rows, keeper)
        sim[starts] = 1.0
        leave = np.zeros(rows.size, dtype=bool) if split_below is None else sim < np.float32(split_below)
        stay_count = np.add.reduceat((~leave).astype(np.int64), starts)
        kept_group = np.repeat(stay_count >= 2, ends - starts) & ~leave
        out_rows.append(rows[kept_group])
        out_keeper.append(keeper[kept_group])
        out_sim.append(sim[kept_group])
        if not leave.any():
            break
        leaver = np.zeros(n, dtype=bool)
        leaver[rows[leave]] = True
        both = leaver[ei] & leaver[ej]
        ei, ej = ei[both], ej[both]

    if not out_rows or sum(r.size for r in out_rows) == 0:
        return pl.DataFrame(schema=GROUP_SCHEMA)
    rows = np.concatenate(out_rows)
    keeper = np.concatenate(out_keeper)
    sim = np.concatenate(out_sim).astype(np.float32)
    # Regroup by keeper (each final group has exactly one keeper), keeper first in each group.
    order = np.lexsort((rows != keeper, keeper))
    rows, keeper, sim = rows[order], keeper[order], sim[order]
    starts, ends = _group_bounds(keeper)
    sizes = ends - starts
    min_sim = np.minimum.reduceat(np.where(rows == keeper, np.float32(np.inf), sim), starts)
    diam = _diameters(x, rows, starts, ends, sim)
    df = pl.DataFrame(
        {
            "image_id": ids_arr[rows].astype(str),
            "group_id": ids_arr[keeper].astype(str),
            "is_keeper": rows == keeper,
            "similarity_to_keeper": sim,
            "group_size": np.repeat(sizes, sizes).astype(np.int32),
            "group_min_similarity": np.repeat(min_sim, sizes).astype(np.float32),
            "group_diameter": np.repeat(diam, sizes),
        },
        schema=GROUP_SCHEMA,
    )
    return df.sort("group_id", "image_id")
