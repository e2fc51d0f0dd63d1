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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "Clustering",
    "ClusteringConfig",
    "assign",
    "choose_k",
    "default_subset_size",
    "fit_clusterings",
    "resolve_faiss_device",
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
        device: "auto" (faiss GPU when a GPU and the faiss GPU build are present, else CPU),
            "cpu", or "cuda" (fails when faiss cannot use a GPU).
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
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


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
    import faiss  # deferred: importing faiss costs ~0.3 s and the module is optional for callers

    return faiss


def resolve_faiss_device(device: str) -> str:
    """"cuda" when faiss can use a GPU (and device allows it), else "cpu"; explicit "cuda" without one fails."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    faiss = _faiss()
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    n_gpus = faiss.get_num_gpus() if has_gpu_build else 0
    if n_gpus > 0:
        return "cuda"
    if device == "cuda":
        why = "the installed faiss is the CPU build" if not has_gpu_build else "faiss sees no GPU"
        raise RuntimeError(
            f"device='cuda' was requested for k-means but {why}; install the `gpu` extra "
            "(faiss-gpu, after `pip uninstall faiss-cpu`) on a machine with a GPU, or use device='auto' or 'cpu'"
        )
    return "cpu"


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D (n, d) array, got shape {x.shape}")
    return x


def _unit_rows(c: np.ndarray) -> np.ndarray:
    c = np.ascontiguousarray(c, dtype=np.float32)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return c / norms


def assign(
    x: np.ndarray, centroids: np.ndarray, soft: bool, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest (and, when soft, second-nearest) centroid of every row by inner product.

    Returns int32 labels of shape (n,); labels2 is None unless soft. With a single centroid the
    second label equals the first (there is no other cluster to share).
    """
    x = _as_matrix(x)
    centroids = _as_matrix(centroids)
    n, k = x.shape[0], centroids.shape[0]
    if k == 0:
        if n:
            raise ValueError("cannot assign vectors to zero centroids")
        empty = np.zeros(0, dtype=np.int32)
        return empty, (empty.copy() if soft else None)
    if k == 1 or n == 0:
        labels = np.zeros(n, dtype=np.int32)
        return labels, (labels.copy() if soft else None)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    faiss = _faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    if resolve_faiss_device(device) == "cuda":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    _, ids = index.search(x, 2 if soft else 1)
    labels = ids[:, 0].astype(np.int32)
    return labels, (ids[:, 1].astype(np.int32) if soft else None)


def fit_clusterings(
    x: np.ndarray, cfg: ClusteringConfig, log: Callable[[str], None] | None = None
) -> list[Clustering]:
    """Fit `cfg.n_clusterings` spherical k-means clusterings, each on its own random subset, and
    assign every row of x to each of them."""
    x = _as_matrix(x)
    n, d = x.shape
    device = resolve_faiss_device(cfg.device)
    k_wanted = cfg.k if cfg.k is not None else choose_k(n)
    subset_size = min(n, cfg.subset_size) if cfg.subset_size is not None else default_subset_size(n, k_wanted)
    # faiss needs at least k training points; with n < k every point becomes its own cluster.
    k = min(k_wanted, subset_size)
    out: list[Clustering] = []
    for c in range(cfg.n_clusterings):
        t0 = time.perf_counter()
        if k <= 1:
            centroids = _unit_rows(x.mean(axis=0, keepdims=True)) if n else np.zeros((0, d), np.float32)
        else:
            rng = np.random.default_rng(cfg.seed + c)
            subset = np.sort(rng.choice(n, size=subset_size, replace=False)) if subset_size < n else None
            train = x[subset] if subset is not None else x
            faiss = _faiss()
            km = faiss.Kmeans(
                d,
                k,
                niter=cfg.niter,
                spherical=True,
                seed=int(cfg.seed + c) % (2**31),
                gpu=device == "cuda",
                verbose=False,
                # We did the sampling ourselves; stop faiss from resampling or warning about it.
                max_points_per_centroid=max(1, -(-subset_size // k)),
                min_points_per_centroid=1,
            )
            km.train(train)
            centroids = _unit_rows(km.centroids)
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
