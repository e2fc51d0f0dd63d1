"""Several spherical k-means clusterings of the image embeddings, each fitted on its own subset.

Grain: one `Clustering` per fit; inside it one label (and optionally a second label) per row of
the embedding matrix `x` (an (n, d) float32 array with unit-norm rows).

Why several: the exact pair search only compares images that share a cluster, so a duplicate
pair that straddles a cluster boundary is missed. DALL·E 2's data pipeline found 85% of the
duplicate pairs with one clustering and 97% with the union of five, each fitted on a different
random subset so that the boundaries fall in different places.

Cost model (d = 512, faiss-cpu on 2 cores): fitting costs ∝ subset · K · niter, assigning
∝ n · K, and the later pair search ∝ Σ cluster_size² ≈ β · n² / K (β ≥ 1 for unbalanced
clusters). Assignment and pair search balance at K ≈ sqrt(β · n), hence `choose_k`; training
on ~40 points per centroid is enough to place boundaries (we need a partition, not good
centroids), which keeps the fit about as cheap as one assignment pass at every n.

Backends, chosen by device (`kernels.resolve_device`): on the CPU faiss (the `cpu` extra,
faiss-cpu) fits and assigns; on a CUDA device torch does both (`_torch_kmeans`,
`_torch_assign_many`) — faiss GPU is never used, because the faiss-gpu-cu12 wheels carry no
kernels for Hopper (sm_90) and faiss aborts the process on CUDA errors. The torch k-means is the
same algorithm as faiss's (random initial centroids drawn from the training points, Lloyd
iterations, centroids renormalized to the unit sphere), so both give the same partition from the
same initial centroids; from their own random starts they reach equally good partitions, not
identical ones (the pair search that follows is exact either way).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dedup_assets.dedup.kernels import fp32_matmul_precision, resolve_device, validate_device
from dedup_assets.embed.base import l2_normalize

__all__ = [
    "Clustering",
    "ClusteringConfig",
    "assign",
    "assign_many",
    "choose_k",
    "default_subset_size",
    "fit_centroids",
    "fit_clusterings",
    "probe_many",
    "split_large_clusters",
]

MAX_CLUSTERINGS = 8  # found_by is a uint8 bitmask, one bit per clustering
POINTS_PER_CENTROID = 40  # faiss warns below 39: fewer points give unstable centroids
K_MAX = 16_384


def choose_k(n: int) -> int:
    """Number of clusters for n vectors: the power of two nearest to sqrt(n), in [1, 16384].

    sqrt(n) balances the cost of assigning every vector to a centroid (n · K dot products)
    against the cost of the exact search inside clusters (≈ n² / K dot products). Rounding to a
    power of two keeps K stable while n grows a little. Examples: n = 1,000,000 → 1024 (the
    DALL·E 2 choice), 100,000 → 256, 20,000 → 128, 1,000 → 32, 10 → 4, n ≤ 1 → 1.
    """
    if n <= 1:
        return 1
    k = 2 ** math.floor(math.log2(n) / 2 + 0.5)
    return int(max(1, min(K_MAX, k, n)))


def default_subset_size(n: int, k: int) -> int:
    """Training points per clustering when none is given: 40 · K, at most n.

    At n = 1,000,000 (K = 1024) that is 40,960 points (5-7 s per 20-iteration fit on 2 cores,
    about what assigning all vectors costs); at n = 100,000 (K = 256) 10,240 points (~0.5 s).
    The seed recipe (K = 1024 on 64 · K points) at n = 100,000 spends ~11 s per fit: its five
    clusterings took 1.0-1.3× the brute-force search, ours 0.14× (benchmarks/bench_candidate_search.py).
    """
    return int(max(min(n, 1), min(n, POINTS_PER_CENTROID * max(k, 1))))


@dataclass(frozen=True)
class ClusteringConfig:
    """How to fit the clusterings.

    Attributes:
        n_clusterings: clusterings to fit (1..8); their pairs are unioned.
        k: clusters per clustering; None → `choose_k(n)`. Clamped to the subset size (so
            n < k works).
        subset_size: training points per clustering; None → `default_subset_size(n, k)`
            (40 · K, at most n). Each clustering draws a different random subset with the
            generator seeded by `seed + index`; when the subset is all n rows the clusterings
            still differ through their k-means initialisation (seeded the same way).
        niter: k-means iterations.
        soft: also record each vector's second-nearest centroid (nprobe = 2): pairs that share
            either cluster are compared, which recovers most pairs cut by a boundary at ~4×
            the pair-search cost. On the synthetic benchmark at n = 1,000,000 five hard
            clusterings found 96% of the pairs (0.025× brute-force time), five soft ones 99.6%
            (0.06×): turn it on for large n when recall matters.
        seed: base random seed.
        device: "auto" (this process's GPU when torch sees one, else the CPU), "cpu" (faiss),
            "cuda" or "cuda:N" (torch on that GPU; fails without one) — `kernels.resolve_device`.
    """

    n_clusterings: int = 5
    k: int | None = None
    subset_size: int | None = None
    niter: int = 20
    soft: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.n_clusterings <= MAX_CLUSTERINGS:
            raise ValueError(
                f"n_clusterings must be between 1 and {MAX_CLUSTERINGS} (found_by is an 8-bit mask), "
                f"got {self.n_clusterings}"
            )
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 or None (automatic), got {self.k}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ValueError(f"subset_size must be >= 1 or None (automatic), got {self.subset_size}")
        if self.niter < 1:
            raise ValueError(f"niter must be >= 1, got {self.niter}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        validate_device(self.device)


@dataclass
class Clustering:
    """One fitted clustering: its centroids and the cluster of every row of x."""

    index: int
    k: int
    subset_size: int
    centroids: np.ndarray  # (k, d) float32, unit-norm rows
    labels: np.ndarray  # (n,) int32, nearest centroid
    labels2: np.ndarray | None  # (n,) int32, second-nearest centroid (== labels when k == 1), or None
    fit_seconds: float
    assign_seconds: float


def _faiss():
    """The faiss module (CPU build); a clear error naming the extra when it is missing."""
    try:
        import faiss  # deferred: importing faiss costs ~0.3 s and only the CPU path needs it
    except ImportError as exc:
        raise RuntimeError(
            "k-means and centroid assignment on the CPU use faiss, which is not installed: "
            "`pip install -e '.[cpu]'` (faiss-cpu; `make` installs it), or run on a GPU with "
            "device='cuda' (torch does k-means there)"
        ) from exc
    return faiss


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D (n, d) array, got shape {x.shape}")
    return x


def _trivial_assignment(n: int, k: int, soft: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The answer when there is nothing to search (no rows or at most one centroid), else None."""
    if k == 0:
        if n:
            raise ValueError("cannot assign vectors to zero centroids")
        empty = np.zeros(0, dtype=np.int32)
        return empty, (empty.copy() if soft else None)
    if k == 1 or n == 0:
        labels = np.zeros(n, dtype=np.int32)
        return labels, (labels.copy() if soft else None)
    return None


def _faiss_assign(x: np.ndarray, centroids: np.ndarray, soft: bool) -> tuple[np.ndarray, np.ndarray | None]:
    # A flat CPU index over the centroids only (small); it never moves to a GPU.
    index = _faiss().IndexFlatIP(x.shape[1])
    index.add(centroids)
    _, ids = index.search(x, 2 if soft else 1)
    return ids[:, 0].astype(np.int32), (ids[:, 1].astype(np.int32) if soft else None)


def _chunk_rows(k_total: int, budget_floats: int = 1 << 26) -> int:
    """Rows per similarity chunk so that a chunk × k_total float32 matrix stays near 256 MB."""
    return max(1, budget_floats // max(1, k_total))


def _torch_assign_many(
    x: np.ndarray, centroids_list: Sequence[np.ndarray], soft: bool, device: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nearest and second-nearest centroid of every row for several centroid sets in one pass:
    the sets are stacked into one matrix, so each chunk of rows is one GEMM (IEEE float32, no
    TF32, so near-ties are decided as on the CPU) followed by a top-2 per set. Rows move to the
    device one chunk at a time; only the int32 labels come back."""
    import torch

    dev = torch.device(device)
    sizes = [c.shape[0] for c in centroids_list]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = x.shape[0]
    top = [(np.empty(n, np.int32), np.empty(n, np.int32)) for _ in sizes]
    chunk = _chunk_rows(int(offsets[-1]))
    with torch.inference_mode(), fp32_matmul_precision():
        c = torch.from_numpy(np.concatenate(list(centroids_list), axis=0)).to(dev)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            s = torch.from_numpy(x[r0:r1]).to(dev) @ c.T
            for t, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
                idx = torch.topk(s[:, lo:hi], 2 if soft else 1, dim=1).indices.to(torch.int32).cpu().numpy()
                top[t][0][r0:r1] = idx[:, 0]
                if soft:
                    top[t][1][r0:r1] = idx[:, 1]
    return top


def assign_many(
    x: np.ndarray, centroids_list: Sequence[np.ndarray], soft: bool = True, device: str = "cpu"
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`assign` of one chunk of vectors (e.g. one shard) to the centroids of several clusterings.

    Returns one (labels, labels2) per centroid set, in order (labels2 None unless soft). On a
    CUDA device all sets are searched in one pass over the rows (`_torch_assign_many`); on the
    CPU each set is one faiss flat search over the chunk.
    """
    x = _as_matrix(x)
    sets = [_as_matrix(c) for c in centroids_list]
    for c in sets:
        if c.shape[0] and c.shape[1] != x.shape[1]:
            raise ValueError(f"centroids have dimension {c.shape[1]} but x has {x.shape[1]}")
    out: list[tuple[np.ndarray, np.ndarray | None] | None] = [
        _trivial_assignment(x.shape[0], c.shape[0], soft) for c in sets
    ]
    todo = [t for t, r in enumerate(out) if r is None]
    if todo:
        resolved = resolve_device(device)
        if resolved == "cpu":
            for t in todo:
                out[t] = _faiss_assign(x, sets[t], soft)
        else:
            found = _torch_assign_many(x, [sets[t] for t in todo], soft, resolved)
            for t, (labels, labels2) in zip(todo, found):
                out[t] = (labels, labels2 if soft else None)
    return out  # type: ignore[return-value]


def assign(
    x: np.ndarray, centroids: np.ndarray, soft: bool, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest (and, when soft, second-nearest) centroid of every row by inner product.

    Returns int32 labels of shape (n,); labels2 is None unless soft. With a single centroid the
    second label equals the first (there is no other cluster to share).
    """
    return assign_many(x, [centroids], soft=soft, device=device)[0]


def _torch_kmeans(
    train: np.ndarray, k: int, niter: int, seed: int, device: str, init: np.ndarray | None = None
) -> np.ndarray:
    """Spherical k-means in torch (the GPU path of `fit_clusterings`; runs on any torch device).

    Initial centroids: k distinct training points drawn with numpy's generator seeded by `seed`
    (or `init`). Each iteration assigns every training point to its nearest centroid by inner
    product (IEEE float32), sums each cluster's points and renormalizes the sums to unit length.
    A cluster left empty takes the training point worst served by its centroid, so K stays K.
    The training sample (40 · K rows by default) lives on the device; nothing else does.
    """
    import torch

    n, d = train.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of training points ({n}), got {k}")
    dev = torch.device(device)
    chunk = _chunk_rows(k)
    with torch.inference_mode(), fp32_matmul_precision():
        x = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32)).to(dev)
        if init is None:
            picks = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
            c = x[torch.from_numpy(picks).to(dev)].clone()
        else:
            c = torch.from_numpy(_as_matrix(init)).to(dev)
        labels = torch.empty(n, dtype=torch.int64, device=dev)
        best = torch.empty(n, dtype=torch.float32, device=dev)
        for _ in range(niter):
            for r0 in range(0, n, chunk):
                best[r0 : r0 + chunk], labels[r0 : r0 + chunk] = (x[r0 : r0 + chunk] @ c.T).max(dim=1)
            sums = torch.zeros((k, d), dtype=torch.float32, device=dev).index_add_(0, labels, x)
            empty = torch.bincount(labels, minlength=k) == 0
            n_empty = int(empty.sum())
            if n_empty:
                worst = torch.topk(best, n_empty, largest=False).indices
                sums[empty] = x[worst]
            c = sums / torch.linalg.vector_norm(sums, dim=1, keepdim=True).clamp_min(1e-12)
        return c.cpu().numpy()


def _faiss_kmeans(train: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    """Spherical k-means with faiss on the CPU (the CPU path of `fit_clusterings`)."""
    km = _faiss().Kmeans(
        train.shape[1],
        k,
        niter=niter,
        spherical=True,
        seed=seed % (2**31),
        verbose=False,
        # We did the sampling ourselves; stop faiss from resampling or warning about it.
        max_points_per_centroid=max(1, -(-train.shape[0] // k)),
        min_points_per_centroid=1,
    )
    km.train(train, init_centroids=init)
    return km.centroids


def fit_clusterings(
    x: np.ndarray, cfg: ClusteringConfig, log: Callable[[str], None] | None = None
) -> list[Clustering]:
    """Fit `cfg.n_clusterings` spherical k-means clusterings, each on its own random subset, and
    assign every row of x to each of them."""
    x = _as_matrix(x)
    n, d = x.shape
    device = resolve_device(cfg.device)
    k_wanted = cfg.k if cfg.k is not None else choose_k(n)
    subset_size = min(n, cfg.subset_size) if cfg.subset_size is not None else default_subset_size(n, k_wanted)
    # faiss needs at least k training points; with n < k every point becomes its own cluster.
    k = min(k_wanted, subset_size)
    out: list[Clustering] = []
    for c in range(cfg.n_clusterings):
        t0 = time.perf_counter()
        if k <= 1:
            centroids = l2_normalize(x.mean(axis=0, keepdims=True)) if n else np.zeros((0, d), np.float32)
        else:
            rng = np.random.default_rng(cfg.seed + c)
            subset = np.sort(rng.choice(n, size=subset_size, replace=False)) if subset_size < n else None
            train = x[subset] if subset is not None else x
            if device == "cpu":
                centroids = l2_normalize(_faiss_kmeans(train, k, cfg.niter, int(cfg.seed + c)))
            else:
                centroids = l2_normalize(_torch_kmeans(train, k, cfg.niter, int(cfg.seed + c), device))
        fit_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        labels, labels2 = assign(x, centroids, cfg.soft, device=device)
        assign_seconds = time.perf_counter() - t1
        out.append(
            Clustering(
                index=c,
                k=int(centroids.shape[0]),
                subset_size=int(subset_size),
                centroids=centroids,
                labels=labels,
                labels2=labels2,
                fit_seconds=fit_seconds,
                assign_seconds=assign_seconds,
            )
        )
        if log is not None:
            log(
                f"clustering {c}: K={centroids.shape[0]} on {subset_size} of {n} vectors, "
                f"fit {fit_seconds:.2f}s, assign {assign_seconds:.2f}s"
                f" on {device}"
            )
    return out


def fit_centroids(
    train: np.ndarray, k: int, niter: int, seed: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """One spherical k-means fit on a training sample (the streamed corpus stage draws it from the
    store): (centroids (k', d) unit rows, training points nearest each centroid). k' = min(k, rows);
    one row or k ≤ 1 gives the sample's normalized mean."""
    train = _as_matrix(train)
    n, d = train.shape
    if n == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    k = max(1, min(int(k), n))
    resolved = resolve_device(device)
    if k == 1:
        centroids = l2_normalize(train.mean(axis=0, keepdims=True))
    elif resolved == "cpu":
        centroids = l2_normalize(_faiss_kmeans(train, k, niter, int(seed)))
    else:
        centroids = l2_normalize(_torch_kmeans(train, k, niter, int(seed), resolved))
    labels, _ = assign(train, centroids, soft=False, device=resolved)
    return centroids, np.bincount(labels, minlength=centroids.shape[0]).astype(np.int64)


def probe_many(
    x: np.ndarray, centroids_list: Sequence[np.ndarray], probes: int = 2, margin: float = 0.0, device: str = "cpu",
    second_margin: float | None = None,
) -> list[np.ndarray]:
    """Multi-probe assignment: for each centroid set, an (n, probes) int32 matrix of cluster ids.

    Column 0 is the nearest centroid, column 1 (when probes ≥ 2) the second-nearest, as with soft
    assignment; columns 2.. hold the next centroids only where their similarity is within
    `margin` of the nearest one's (else -1). So vectors near several cluster boundaries — in the
    dense regions where near-neighbour pairs are cut by k-means cells — join up to `probes`
    clusters, and the others stay in two. With `second_margin`, the second cluster too is kept
    only within that margin: a "hub" centroid that is everybody's second choice (it sits near the
    mean of many clusters) then no longer collects a huge soft cluster.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x = _as_matrix(x)
    out: list[np.ndarray] = []
    resolved = resolve_device(device)
    for c in centroids_list:
        c = _as_matrix(c)
        p = int(min(probes, max(1, c.shape[0])))
        if c.shape[0] <= 1 or x.shape[0] == 0:
            lab = np.full((x.shape[0], probes), -1, np.int32)
            lab[:, 0] = 0
            if probes >= 2:
                lab[:, 1] = 0
            out.append(lab)
            continue
        if resolved == "cpu":
            index = _faiss().IndexFlatIP(x.shape[1])
            index.add(c)
            sims, ids = index.search(x, p)
        else:
            import torch

            dev = torch.device(resolved)
            sims = np.empty((x.shape[0], p), np.float32)
            ids = np.empty((x.shape[0], p), np.int64)
            chunk = _chunk_rows(c.shape[0])
            with torch.inference_mode(), fp32_matmul_precision():
                ct = torch.from_numpy(c).to(dev)
                for r0 in range(0, x.shape[0], chunk):
                    v, i = torch.topk(torch.from_numpy(x[r0:r0 + chunk]).to(dev) @ ct.T, p, dim=1)
                    sims[r0:r0 + chunk], ids[r0:r0 + chunk] = v.cpu().numpy(), i.cpu().numpy()
        lab = np.full((x.shape[0], probes), -1, np.int32)
        lab[:, :p] = ids.astype(np.int32)
        if p > 2:
            far = sims[:, 2:] < (sims[:, :1] - np.float32(margin))
            lab[:, 2:p][far] = -1
        if p > 1 and second_margin is not None:
            lab[:, 1][sims[:, 1] < sims[:, 0] - np.float32(second_margin)] = -1
        out.append(lab)
    return out


def split_large_clusters(
    train: np.ndarray, centroids: np.ndarray, max_load: int, niter: int = 10, seed: int = 0, device: str = "cpu",
    max_rounds: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Split every cluster that holds more than `max_load` training points into ⌈load / mean load⌉
    clusters (k-means on its own points), so no cluster of the corpus is many times the mean.

    k-means fitted on a sample can leave one cluster with a large share of a corpus (at 1M
    synthetic vectors, one of 1,024 clusters held 128k vectors: 46 of its 59 G comparisons in one
    step). Splitting adds centroids where the data is dense: K grows where it must. Returns
    (centroids, training points per centroid).
    """
    train = _as_matrix(train)
    cents = l2_normalize(centroids)
    for r in range(max_rounds):
        labels, _ = assign(train, cents, soft=False, device=device)
        load = np.bincount(labels, minlength=cents.shape[0])
        mean = max(1.0, train.shape[0] / max(1, cents.shape[0]))
        big = np.flatnonzero(load > max_load)
        if big.size == 0:
            return cents, load.astype(np.int64)
        keep = np.ones(cents.shape[0], bool)
        extra = []
        for k in big.tolist():
            pts = train[labels == k]
            sub, _ = fit_centroids(pts, int(math.ceil(load[k] / mean)), niter, seed + 7919 * (r + 1) + k, device)
            if sub.shape[0] > 1:
                keep[k] = False
                extra.append(sub)
        if not extra:  # identical points cannot be split
            return cents, load.astype(np.int64)
        cents = np.concatenate([cents[keep]] + extra, axis=0)
    labels, _ = assign(train, cents, soft=False, device=device)
    return cents, np.bincount(labels, minlength=cents.shape[0]).astype(np.int64)
