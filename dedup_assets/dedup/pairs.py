"""Exact cosine pair search inside clusters, the union over clusterings, and the brute-force baseline.

Grain: a `Pairs` holds one entry per unordered pair of row indices (i < j) of the embedding
matrix `x` ((n, d) float32, unit-norm rows) whose cosine is at least the threshold.

The search is exact within its scope: every pair that shares a cluster is compared with a
dot product, in blocks of at most `block_size` × `block_size` so that a huge cluster never
materializes its full similarity matrix. On a machine with a CUDA GPU the same blocks run
through torch; otherwise numpy's BLAS does the work (both cores).
"""

from __future__ import annotations

import glob
import importlib.util
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from dedup_assets.dedup.kmeans import _as_matrix  # one validation of (n, d) float32 input for both

__all__ = [
    "Pairs",
    "brute_force_pairs",
    "pairs_within_clusters",
    "resolve_torch_device",
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


def resolve_torch_device(device: str) -> str:
    """"cuda" or "cpu" for the pair search; device="cuda" without a usable GPU raises.

    "auto" only imports torch when the machine exposes a GPU device node, so CPU-only runs
    don't pay torch's import time.
    """
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    has_node = bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/dxg") or glob.glob("/dev/kfd"))
    if device == "auto" and not has_node:
        return "cpu"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    if device == "cuda":
        raise RuntimeError(
            "device='cuda' was requested for the pair search but torch sees no CUDA GPU; "
            "use device='auto' or 'cpu' on this machine"
        )
    return "cpu"


def _check_common(threshold: float, block_size: int) -> None:
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine and must lie in [-1, 1], got {threshold}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


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


def _blocks(size: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Upper-triangular block grid of a size × size similarity matrix."""
    for r0 in range(0, size, block_size):
        r1 = min(size, r0 + block_size)
        for c0 in range(r0, size, block_size):
            yield r0, r1, c0, min(size, c0 + block_size)


class _NumpySearch:
    """Blocked threshold search on the CPU (numpy matmul → BLAS sgemm)."""

    def __init__(self, x: np.ndarray, threshold: float, block_size: int) -> None:
        self.x = x
        self.t = np.float32(threshold)
        self.b = block_size
        self.out_i: list[np.ndarray] = []
        self.out_j: list[np.ndarray] = []
        self.out_s: list[np.ndarray] = []
        self.comparisons = 0

    def group(self, members: np.ndarray | None, size: int) -> None:
        """All pairs among `members` (ascending row ids; None = all rows 0..size-1)."""
        x, t = self.x, self.t
        cached: tuple[int, np.ndarray] | None = None
        for r0, r1, c0, c1 in _blocks(size, self.b):
            if cached is None or cached[0] != r0:
                a = x[r0:r1] if members is None else x[members[r0:r1]]
                cached = (r0, a)
            a = cached[1]
            bm = a if c0 == r0 else (x[c0:c1] if members is None else x[members[c0:c1]])
            s = a @ bm.T
            self.comparisons += s.size
            p, q = np.nonzero(s >= t)
            if c0 == r0:  # diagonal block: keep the strict upper triangle (i < j, no self pairs)
                keep = p < q
                p, q = p[keep], q[keep]
            if p.size:
                self.out_s.append(s[p, q].astype(np.float32, copy=False))
                gp, gq = p + r0, q + c0
                self.out_i.append(gp.astype(np.int64) if members is None else members[gp])
                self.out_j.append(gq.astype(np.int64) if members is None else members[gq])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        if not self.out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), self.comparisons
        return (
            np.concatenate(self.out_i),
            np.concatenate(self.out_j),
            np.concatenate(self.out_s),
            self.comparisons,
        )


class _TorchSearch:
    """The same blocked search with torch on a CUDA device (x is copied to the GPU once)."""

    def __init__(self, x: np.ndarray, threshold: float, block_size: int) -> None:
        import torch

        self.torch = torch
        self.x = torch.from_numpy(x).to("cuda")
        self.t = float(np.float32(threshold))
        self.b = block_size
        self.out_i: list = []
        self.out_j: list = []
        self.out_s: list = []
        self.comparisons = 0

    def group(self, members: np.ndarray | None, size: int) -> None:
        # TF32 matmuls (which another module may have switched on globally) round cosines to
        # ~1e-3 and would move pairs across the threshold: force full float32 while we search.
        matmul = self.torch.backends.cuda.matmul
        saved = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            self._group(members, size)
        finally:
            matmul.allow_tf32 = saved

    def _group(self, members: np.ndarray | None, size: int) -> None:
        torch, x = self.torch, self.x
        m = None if members is None else torch.from_numpy(members).to(x.device)
        cached = None
        for r0, r1, c0, c1 in _blocks(size, self.b):
            if cached is None or cached[0] != r0:
                cached = (r0, x[r0:r1] if m is None else x[m[r0:r1]])
            a = cached[1]
            bm = a if c0 == r0 else (x[c0:c1] if m is None else x[m[c0:c1]])
            s = a @ bm.T
            self.comparisons += int(s.shape[0]) * int(s.shape[1])
            hits = torch.nonzero(s >= self.t)
            p, q = hits[:, 0], hits[:, 1]
            if c0 == r0:
                keep = p < q
                p, q = p[keep], q[keep]
            if p.numel():
                self.out_s.append(s[p, q])
                gp, gq = p + r0, q + c0
                self.out_i.append(gp if m is None else m[gp])
                self.out_j.append(gq if m is None else m[gq])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        torch = self.torch
        if not self.out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), self.comparisons
        return (
            torch.cat(self.out_i).to(torch.int64).cpu().numpy(),
            torch.cat(self.out_j).to(torch.int64).cpu().numpy(),
            torch.cat(self.out_s).to(torch.float32).cpu().numpy(),
            self.comparisons,
        )


def _searcher(x: np.ndarray, threshold: float, block_size: int, device: str):
    if resolve_torch_device(device) == "cuda":
        return _TorchSearch(x, threshold, block_size)
    return _NumpySearch(x, threshold, block_size)


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
    once. Peak extra memory per step: block_size² similarities plus 2 · block_size rows of x.
    `comparisons` counts the dot products computed (diagonal blocks are computed in full).
    """
    x = _as_matrix(x)
    n = x.shape[0]
    _check_common(threshold, block_size)
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
    search = _searcher(x, threshold, block_size, device)
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s >= 2:
            search.group(rows[s:e], e - s)
    i, j, sim, comparisons = search.result()
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
    _check_common(threshold, block_size)
    search = _searcher(x, threshold, block_size, device)
    if x.shape[0] >= 2:
        search.group(None, x.shape[0])
    i, j, sim, comparisons = search.result()
    return _sorted_pairs(i, j, sim, np.zeros(i.shape[0], np.uint8), comparisons)
