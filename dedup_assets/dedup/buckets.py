"""Buckets of clusters: how the corpus-wide pair search is cut into steps of bounded size.

The five clusterings give every vector a cluster (and, with soft assignment, a second one) in
each clustering. A *bucket* is a set of clusters of every clustering; the pair search of one
bucket is one Dagster step, which holds only the vectors routed to that bucket.

Planning (`plan_buckets`): the clusters of clustering 0 are grouped into `n_buckets`
super-clusters (spherical k-means of its centroids, seeded), and the clusters of every
clustering are placed with the nearest super-centroid that still has room (clusters taken
largest first, room = `BALANCE` × the mean load, load = the cluster's share of its fit sample).
So a vector's clusters in all clusterings usually fall in the same bucket: it is written to
about one bucket instead of up to 2 × 5, and the buckets carry similar loads.

Routing (`route`): for one batch of vectors, the entries (vector, clustering, cluster,
cluster2) of each bucket, with a cluster that belongs to another bucket replaced by -1 there.

Search (`search_bucket`): exact pairs ≥ τ inside each cluster of the bucket, cluster by
cluster, through `kernels.block_pairs` (CPU blocks, or fp16 GEMM re-scored in float32 on a
GPU); vectors are fetched per cluster from the bucket's files (memory-mapped), and each
cluster's pairs leave as a chunk (`bucket_pair_chunks`), so a step holds one cluster's rows and
its pairs; the step spills chunks to files and unions them in DuckDB. With `is_new`, only pairs that touch a new vector
are computed (incremental dedup: |new in cluster| × |cluster| dot products).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dedup_assets.dedup.kernels import block_comparisons, block_pairs, resolve_device
from dedup_assets.dedup.pairs import band_keep
from dedup_assets.embed.base import l2_normalize

__all__ = [
    "BALANCE",
    "BucketPairs",
    "BucketStats",
    "VectorFiles",
    "bucket_pair_chunks",
    "choose_n_buckets",
    "fit_bucket_count",
    "plan_buckets",
    "route",
    "search_bucket",
    "union_chunks",
]

BALANCE = 1.25  # a bucket takes at most this multiple of the mean load (then the next-nearest)
ROWS_PER_BUCKET = 200_000  # default rule: one bucket per this many vectors (≈ 400 MB at d = 512)


def choose_n_buckets(n: int, k: int, rows_per_bucket: int = ROWS_PER_BUCKET) -> int:
    """Buckets for n vectors and K clusters: ⌈n / rows_per_bucket⌉, at least 2 (so the fan-out is
    always exercised), at most K and 1024."""
    if rows_per_bucket < 1:
        raise ValueError(f"rows_per_bucket must be >= 1, got {rows_per_bucket}")
    want = max(2, -(-int(n) // int(rows_per_bucket)))
    return int(max(1, min(want, int(k), 1024)))


def _super_centroids(c0: np.ndarray, n_buckets: int, seed: int, niter: int = 10) -> np.ndarray:
    """Spherical k-means (numpy; K ≤ 16k points) of clustering 0's centroids into n_buckets."""
    k = c0.shape[0]
    rng = np.random.default_rng(seed)
    s = l2_normalize(c0[np.sort(rng.choice(k, size=n_buckets, replace=False))])
    x = l2_normalize(c0)
    for _ in range(niter):
        lab = np.argmax(x @ s.T, axis=1)
        sums = np.zeros_like(s)
        np.add.at(sums, lab, x)
        empty = np.bincount(lab, minlength=n_buckets) == 0
        sums[empty] = s[empty]
        s = l2_normalize(sums)
    return s


def plan_buckets(
    centroids: Sequence[np.ndarray],
    loads: Sequence[np.ndarray],
    n_buckets: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """The bucket (0..n_buckets-1) of every cluster of every clustering.

    centroids[c]: (K_c, d) unit rows; loads[c]: (K_c,) non-negative weights (e.g. points of the
    fit sample per cluster). Returns one int32 array of shape (K_c,) per clustering.
    """
    if len(centroids) != len(loads):
        raise ValueError(f"one load array per clustering: {len(centroids)} centroid sets, {len(loads)} loads")
    if not centroids:
        return []
    k0 = centroids[0].shape[0]
    b = int(max(1, min(int(n_buckets), k0)))
    if b == 1:
        return [np.zeros(c.shape[0], np.int32) for c in centroids]
    sup = _super_centroids(centroids[0], b, seed)
    out = []
    for cents, load in zip(centroids, loads):
        load = np.asarray(load, dtype=np.float64)
        if load.shape != (cents.shape[0],):
            raise ValueError(f"loads must have one value per cluster ({cents.shape[0]}), got {load.shape}")
        load = load + 1e-9  # every cluster counts a little, so empty ones spread too
        room = BALANCE * load.sum() / b
        pref = np.argsort(-(l2_normalize(cents) @ sup.T), axis=1)  # buckets by closeness, per cluster
        filled = np.zeros(b)
        bucket = np.empty(cents.shape[0], np.int32)
        for k in np.argsort(-load, kind="stable"):
            for cand in pref[k]:
                if filled[cand] + load[k] <= room or filled[cand] == 0:
                    break
            else:
                cand = int(np.argmin(filled))
            bucket[k] = cand
            filled[cand] += load[k]
        out.append(bucket)
    return out


def fit_bucket_count(
    centroids: Sequence[np.ndarray],
    loads: Sequence[np.ndarray],
    sample_labels: Sequence,
    n: int,
    n_buckets: int,
    rows_per_bucket: int,
    seed: int = 0,
    slack: float = 1.25,
    max_buckets: int = 1024,
    log: Callable[[str], None] | None = None,
) -> tuple[int, list[np.ndarray]]:
    """(bucket count, plan) such that the largest bucket is expected to hold ≤ slack × rows_per_bucket
    of the n vectors.

    A vector is written to every bucket that holds one of its clusters (1.5–2.5 copies) and buckets
    differ in size, so ⌈n / rows_per_bucket⌉ buckets come out several times too big. The sample's
    labels (as `route` takes them, e.g. from `kmeans.probe_many` on the last fit sample) are routed
    through the plan and scaled to n; buckets are added until the largest fits (≤ 4 re-plans). A
    bucket step reads its vectors per cluster from memory-mapped files; beyond the page cache a
    memory cap turns those reads into disk thrash (seen at 4M: 937k-vector buckets, 13× slower)."""
    nb = int(n_buckets)
    plan = plan_buckets(centroids, loads, nb, seed=seed)
    limit = min(int(max_buckets), int(centroids[0].shape[0]) if centroids else 1)
    m = int(np.asarray(sample_labels[0][0] if isinstance(sample_labels[0], tuple) else sample_labels[0]).shape[0]) if sample_labels else 0
    if m == 0:
        return nb, plan
    for _ in range(4):
        largest = max((r.rows.size for r in route(sample_labels, plan).values()), default=0) * n / m
        want = int(np.ceil(nb * largest / (slack * rows_per_bucket)))
        if largest <= slack * rows_per_bucket or want <= nb or nb >= limit:
            break
        new = min(want, limit)
        if log is not None:
            log(f"buckets: the largest of {nb} would hold ~{largest:,.0f} vectors; planning {new}")
        nb = new
        plan = plan_buckets(centroids, loads, nb, seed=seed)
    return nb, plan


@dataclass
class Routed:
    """One bucket's share of a batch: `rows` (batch positions of its distinct vectors) and one
    entry per (vector, clustering) with `vec` an index into `rows`."""

    rows: np.ndarray  # int64, ascending
    vec: np.ndarray  # int32
    clustering: np.ndarray  # int8
    cluster: np.ndarray  # int32, -1 when this clustering's first cluster is in another bucket
    cluster2: np.ndarray  # int32, -1 when absent, equal to cluster, or in another bucket


def route(
    labels: Sequence[tuple[np.ndarray, np.ndarray | None] | np.ndarray], bucket_of: Sequence[np.ndarray]
) -> dict[int, Routed]:
    """Split a batch's cluster labels into buckets.

    One item per clustering: (labels, labels2) as from `kmeans.assign_many`, or an (n, P) matrix
    from `kmeans.probe_many` (column p = the p-th probe, -1 = none). The first two clusters of a
    vector go in one entry (cluster, cluster2); each further probe is an extra entry (-1, cluster).
    """
    per: dict[int, list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]] = {}
    for c, (lab, bmap) in enumerate(zip(labels, bucket_of)):
        if isinstance(lab, tuple):
            l1, l2 = lab
            cols = [np.asarray(l1, dtype=np.int64)] + ([np.asarray(l2, dtype=np.int64)] if l2 is not None else [])
        else:
            m = np.asarray(lab, dtype=np.int64)
            cols = [m[:, p] for p in range(m.shape[1])]
        l1 = cols[0]
        b1 = bmap[l1]
        l2 = cols[1] if len(cols) > 1 else np.full_like(l1, -1)
        l2 = np.where(l2 == l1, -1, l2)
        b2 = np.where(l2 >= 0, bmap[np.maximum(l2, 0)], -1)
        extra = [(e, np.where(e >= 0, bmap[np.maximum(e, 0)], -1)) for e in cols[2:]]
        touched = [b1, b2[b2 >= 0]] + [be[be >= 0] for _, be in extra]
        for b in np.unique(np.concatenate(touched)).tolist():
            in1, in2 = b1 == b, b2 == b
            rows = np.flatnonzero(in1 | in2)
            per.setdefault(int(b), []).append(
                (rows, c, np.where(in1[rows], l1[rows], -1), np.where(in2[rows], l2[rows], -1))
            )
            for e, be in extra:
                r = np.flatnonzero(be == b)
                if r.size:
                    per[int(b)].append((r, c, np.full(r.size, -1, np.int64), e[r]))
    out: dict[int, Routed] = {}
    for b, parts in per.items():
        rows = np.unique(np.concatenate([p[0] for p in parts]))
        out[b] = Routed(
            rows=rows.astype(np.int64),
            vec=np.concatenate([np.searchsorted(rows, p[0]) for p in parts]).astype(np.int32),
            clustering=np.concatenate([np.full(p[0].size, p[1], np.int8) for p in parts]),
            cluster=np.concatenate([p[2] for p in parts]).astype(np.int32),
            cluster2=np.concatenate([p[3] for p in parts]).astype(np.int32),
        )
    return out


class VectorFiles:
    """Several (m_f, d) float32 .npy files seen as one matrix, memory-mapped; `take` reads rows."""

    def __init__(self, paths: Sequence[Path], d: int) -> None:
        self.arrays = [np.load(p, mmap_mode="r") for p in paths]
        for p, a in zip(paths, self.arrays):
            if a.ndim != 2 or a.shape[1] != d or a.dtype != np.float32:
                raise ValueError(f"{p}: expected a ({'{m}'}, {d}) float32 array, got {a.shape} {a.dtype}")
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays]).astype(np.int64)
        self.d = d

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (ascending) as a contiguous float32 matrix."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.size, self.d), dtype=np.float32)
        f = np.searchsorted(self.offsets, idx, side="right") - 1
        cut = np.flatnonzero(np.diff(f)) + 1
        for s, e in zip(np.concatenate([[0], cut]).tolist(), np.concatenate([cut, [idx.size]]).tolist()):
            if e > s:
                fi = int(f[s])
                out[s:e] = self.arrays[fi][idx[s:e] - self.offsets[fi]]
        return out


@dataclass
class BucketPairs:
    """Pairs found in one bucket, as vector indices of the bucket (vi < vj), each pair once."""

    vi: np.ndarray  # int64
    vj: np.ndarray  # int64
    sim: np.ndarray  # float32
    found_by: np.ndarray  # uint8 bitmask of the clusterings that found the pair
    comparisons: int
    clusters_searched: int
    largest_cluster: int

    def __len__(self) -> int:
        return int(self.vi.size)


@dataclass
class BucketStats:
    """Work done by `bucket_pair_chunks` (filled in as it runs)."""

    comparisons: int = 0
    clusters_searched: int = 0
    largest_cluster: int = 0


def _members(vec: np.ndarray, cluster: np.ndarray, cluster2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep1, keep2 = cluster >= 0, cluster2 >= 0
    mv = np.concatenate([vec[keep1], vec[keep2]]).astype(np.int64)
    mk = np.concatenate([cluster[keep1], cluster2[keep2]]).astype(np.int64)
    order = np.lexsort((mv, mk))
    mv, mk = mv[order], mk[order]
    if mv.size > 1:  # a vector listed twice in one cluster (e.g. one centroid) counts once
        first = np.ones(mv.size, dtype=bool)
        first[1:] = (mv[1:] != mv[:-1]) | (mk[1:] != mk[:-1])
        mv, mk = mv[first], mk[first]
    if mv.size == 0:
        return mv, np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(mk)) + 1
    return mv, np.concatenate([[0], cut]).astype(np.int64), np.concatenate([cut, [mv.size]]).astype(np.int64)


def bucket_pair_chunks(
    take: Callable[[np.ndarray], np.ndarray],
    vec: np.ndarray,
    clustering: np.ndarray,
    cluster: np.ndarray,
    cluster2: np.ndarray,
    threshold: float,
    stats: BucketStats,
    block_size: int = 4096,
    device: str = "cpu",
    is_new: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    band: tuple[float, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair ≥ threshold of vectors that share a cluster of this bucket, one cluster at a time.

    Yields (vi, vj, sim, found_by) chunks with vi < vj (int32 vector indices), float32 cosines and
    the clustering's bit; a pair found by several clusters or clusterings comes once per finder, so
    the consumer unions them (`search_bucket` in memory, or a spill to files merged in DuckDB, as the
    `search_bucket` step does so that one step never holds all of a bucket's pairs).

    `take(rows)` returns the float32 vectors of ascending vector indices. Entry arrays are
    parallel (one per (vector, clustering)); cluster ids < 0 are not in this bucket. With
    `is_new` (bool per vector) only pairs with at least one new vector are returned.
    `progress(done, total)` is called after each clustering; `stats` counts the work.
    With `band` = (hi, k), pairs below hi (down to threshold) are kept only when among the k most
    similar of either image within the cluster (`pairs.band_keep`): bounded candidates far below τ.
    """
    vec = np.asarray(vec, dtype=np.int64)
    clustering = np.asarray(clustering, dtype=np.int64)
    cluster = np.asarray(cluster, dtype=np.int64)
    cluster2 = np.asarray(cluster2, dtype=np.int64)
    if not (vec.shape == clustering.shape == cluster.shape == cluster2.shape):
        raise ValueError("vec, clustering, cluster and cluster2 must be parallel arrays")
    if vec.size and int(vec.max()) >= 2**31 - 1:
        raise ValueError(f"a bucket holds at most 2**31 - 1 vectors, got index {int(vec.max())}")
    resolved = resolve_device(device)
    present = np.unique(clustering).tolist()
    for step, c in enumerate(present, 1):
        if not 0 <= c < 8:
            raise ValueError(f"clustering index {c} does not fit the 8-bit found_by mask")
        sel = clustering == c
        mv, starts, ends = _members(vec[sel], cluster[sel], cluster2[sel])
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e - s < 2:
                continue
            rows = mv[s:e]
            stats.largest_cluster = max(stats.largest_cluster, e - s)
            if is_new is not None:
                new = is_new[rows]
                if not new.any():
                    continue
                x = take(rows)
                a = np.flatnonzero(new)
                i, j, sim = block_pairs(x[a], x, threshold, device=resolved, block_size=block_size)
                gi, gj = rows[a[i]], rows[j]
                keep = (gi != gj) & (~is_new[gj] | (gi < gj))  # a new–new pair once
                gi, gj, sim = gi[keep], gj[keep], sim[keep]
                stats.comparisons += block_comparisons(a.size, rows.size, block_size)
            else:
                x = take(rows)
                i, j, sim = block_pairs(x, None, threshold, device=resolved, block_size=block_size)
                gi, gj = rows[i], rows[j]
                stats.comparisons += block_comparisons(rows.size, None, block_size)
            stats.clusters_searched += 1
            if band is not None and gi.size:
                # incremental: the new images' own top k (gi is the new end); old images' band pairs
                # are not re-ranked, so a run adds at most k band pairs per new image and cluster
                keep = band_keep(gi, gj, sim, band[0], band[1], ends="i" if is_new is not None else "both")
                gi, gj, sim = gi[keep], gj[keep], sim[keep]
            if gi.size:
                yield (np.minimum(gi, gj).astype(np.int32), np.maximum(gi, gj).astype(np.int32),
                       np.asarray(sim, dtype=np.float32), np.full(gi.size, 1 << c, np.uint8))
        if progress is not None:
            progress(step, len(present))


def union_chunks(chunks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray
]:
    """One row per pair of (vi, vj, sim, found_by) chunks: the largest sim, found_by ORed; sorted."""
    if not chunks:
        z = np.zeros(0, np.int64)
        return z, z.copy(), np.zeros(0, np.float32), np.zeros(0, np.uint8)
    i = np.concatenate([c[0] for c in chunks]).astype(np.int64)
    j = np.concatenate([c[1] for c in chunks]).astype(np.int64)
    sim, fb = np.concatenate([c[2] for c in chunks]), np.concatenate([c[3] for c in chunks])
    order = np.lexsort((j, i))
    i, j, sim, fb = i[order], j[order], sim[order], fb[order]
    first = np.ones(i.size, dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    starts = np.flatnonzero(first)
    return (i[starts], j[starts], np.maximum.reduceat(sim, starts).astype(np.float32),
            np.bitwise_or.reduceat(fb, starts).astype(np.uint8))


def search_bucket(
    take: Callable[[np.ndarray], np.ndarray],
    vec: np.ndarray,
    clustering: np.ndarray,
    cluster: np.ndarray,
    cluster2: np.ndarray,
    threshold: float,
    block_size: int = 4096,
    device: str = "cpu",
    is_new: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    band: tuple[float, int] | None = None,
) -> BucketPairs:
    """`bucket_pair_chunks` collected in memory: every pair once (for small buckets and tests)."""
    stats = BucketStats()
    chunks = list(bucket_pair_chunks(take, vec, clustering, cluster, cluster2, threshold, stats,
                                     block_size=block_size, device=device, is_new=is_new, progress=progress,
                                     band=band))
    vi, vj, sim, fb = union_chunks(chunks)
    return BucketPairs(vi, vj, sim, fb, int(stats.comparisons), int(stats.clusters_searched),
                       int(stats.largest_cluster))
