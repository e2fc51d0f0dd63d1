"""Exact pair search: blocked search == naive all-pairs reference, union semantics, GPU path."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.pairs import (
    Pairs,
    brute_force_pairs,
    pairs_within_clusters,
    union_pairs,
)
from dedup_assets.dedup.kernels import resolve_device
from dedup_assets.dedup.synthetic import make_embeddings

TAU = 0.9


def _data(n: int = 600, d: int = 32, seed: int = 1) -> np.ndarray:
    # Planted near-duplicates so that there is something above the threshold.
    x, _ = make_embeddings(n, d=d, seed=seed, n_topics=3, dup_fraction=0.2, chain_fraction=0.05)
    return x


def _naive(x: np.ndarray, labels=None, labels2=None, tau: float = TAU) -> set[tuple[int, int]]:
    """Reference: every pair i < j with cosine ≥ tau whose cluster sets intersect."""
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    n = x.shape[0]
    ok = np.triu(np.ones((n, n), dtype=bool), k=1) & (s >= tau)
    if labels is not None:
        l1 = np.asarray(labels)
        shared = l1[:, None] == l1[None, :]
        if labels2 is not None:
            l2 = np.asarray(labels2)
            shared |= (l1[:, None] == l2[None, :]) | (l2[:, None] == l1[None, :]) | (l2[:, None] == l2[None, :])
        ok &= shared
    a, b = np.nonzero(ok)
    return set(zip(a.tolist(), b.tolist()))


def _as_set(p: Pairs) -> set[tuple[int, int]]:
    return set(zip(p.i.tolist(), p.j.tolist()))


def _no_ties(x: np.ndarray, tau: float = TAU) -> None:
    # float32 block products may round differently from the float64 reference; make sure no
    # pair sits so close to tau that rounding could decide it (precondition of the data).
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    assert np.min(np.abs(s[np.triu_indices(len(x), 1)] - tau)) > 1e-5


def _well_formed(p: Pairs) -> None:
    assert p.i.dtype == np.int64 and p.j.dtype == np.int64
    assert p.sim.dtype == np.float32 and p.found_by.dtype == np.uint8
    assert np.all(p.i < p.j)
    keys = p.i * 10**9 + p.j
    assert np.unique(keys).size == keys.size, "each pair at most once"
    assert np.all(np.diff(keys) > 0), "sorted by (i, j)"


def test_brute_force_equals_naive_for_every_block_size() -> None:
    x = _data()
    _no_ties(x)
    expected = _naive(x)
    assert len(expected) > 100
    # block_size 1 is the extreme of the grid: one dot product per step (on fewer rows).
    assert _as_set(brute_force_pairs(x[:80], TAU, block_size=1, device="cpu")) == _naive(x[:80])
    for block in (7, 64, 600, 4096):
        got = brute_force_pairs(x, TAU, block_size=block, device="cpu")
        _well_formed(got)
        assert _as_set(got) == expected, block
        assert np.all(got.found_by == 0)
        # Upper-triangular grid: at least every pair once, at most the full square.
        assert 600 * 599 // 2 <= got.comparisons <= 600 * 600
        if block >= 600:
            assert got.comparisons == 600 * 600
    s = x @ x.T
    got = brute_force_pairs(x, TAU, device="cpu")
    np.testing.assert_allclose(got.sim, s[got.i, got.j], atol=1e-5)


def test_within_clusters_equals_naive_with_blocks_smaller_than_a_cluster() -> None:
    x = _data()
    _no_ties(x)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=len(x)).astype(np.int32)  # clusters of ~200 rows
    expected = _naive(x, labels)
    assert 0 < len(expected) < len(_naive(x))
    sizes = np.bincount(labels)
    for block in (16, 50, 199, 4096):
        got = pairs_within_clusters(x, labels, threshold=TAU, block_size=block, device="cpu", clustering_index=3)
        _well_formed(got)
        assert _as_set(got) == expected, block
        assert np.all(got.found_by == 1 << 3)
        assert got.comparisons >= int((sizes * (sizes - 1) // 2).sum())
    one_step = pairs_within_clusters(x, labels, threshold=TAU, block_size=4096, device="cpu")
    assert one_step.comparisons == int((sizes**2).sum())


def test_soft_assignment_compares_pairs_sharing_either_cluster_once() -> None:
    x = _data(seed=2)
    _no_ties(x)
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, size=len(x)).astype(np.int32)
    labels2 = (labels + rng.integers(1, 6, size=len(x))) % 6
    labels2[:20] = labels[:20]  # rows whose two clusters coincide
    labels2 = labels2.astype(np.int32)
    hard = pairs_within_clusters(x, labels, threshold=TAU, block_size=37, device="cpu")
    soft = pairs_within_clusters(x, labels, labels2, threshold=TAU, block_size=37, device="cpu")
    _well_formed(soft)
    assert _as_set(soft) == _naive(x, labels, labels2)
    assert _as_set(hard) < _as_set(soft)


def test_union_is_a_superset_of_each_clustering_with_ored_bits() -> None:
    x = _data(seed=3)
    rng = np.random.default_rng(11)
    per = [
        pairs_within_clusters(
            x, rng.integers(0, 4, size=len(x)).astype(np.int32), threshold=TAU, device="cpu", clustering_index=c
        )
        for c in range(4)
    ]
    u = union_pairs(per)
    _well_formed(u)
    union_set = _as_set(u)
    for c, p in enumerate(per):
        assert _as_set(p) <= union_set
        bit = ((u.found_by >> c) & 1).astype(bool)
        assert set(zip(u.i[bit].tolist(), u.j[bit].tolist())) == _as_set(p)
    assert union_set == set().union(*(_as_set(p) for p in per))
    assert u.comparisons == sum(p.comparisons for p in per)
    assert union_set <= _as_set(brute_force_pairs(x, TAU, device="cpu"))
    assert len(union_pairs([])) == 0


def test_tiny_inputs() -> None:
    for n in (0, 1, 2):
        x = np.eye(max(n, 1), 4, dtype=np.float32)[:n]
        if n == 2:
            x[1] = x[0]
        p = pairs_within_clusters(x, np.zeros(n, np.int32), threshold=TAU, device="cpu")
        b = brute_force_pairs(x, TAU, device="cpu")
        assert len(p) == len(b) == (1 if n == 2 else 0)


def test_invalid_arguments_say_what_to_change() -> None:
    x = _data(n=10)
    with pytest.raises(ValueError, match="labels must have shape"):
        pairs_within_clusters(x, np.zeros(9, np.int32))
    with pytest.raises(ValueError, match="block_size"):
        brute_force_pairs(x, TAU, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        brute_force_pairs(x, 1.5)
    with pytest.raises(ValueError, match="clustering_index"):
        pairs_within_clusters(x, np.zeros(10, np.int32), clustering_index=8)


def test_cuda_request_without_a_gpu_fails_clearly() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        brute_force_pairs(_data(n=10), TAU, device="cuda")
    assert resolve_device("auto") == "cpu"


@pytest.mark.gpu
def test_gpu_path_matches_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x = _data(n=3000, d=64, seed=4)
    _no_ties(x)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=len(x)).astype(np.int32)
    labels2 = ((labels + rng.integers(1, 5, size=len(x))) % 5).astype(np.int32)
    for l2 in (None, labels2):
        cpu = pairs_within_clusters(x, labels, l2, threshold=TAU, block_size=256, device="cpu")
        gpu = pairs_within_clusters(x, labels, l2, threshold=TAU, block_size=256, device="cuda")
        assert _as_set(cpu) == _as_set(gpu)
        assert cpu.comparisons == gpu.comparisons
        np.testing.assert_allclose(cpu.sim, gpu.sim, atol=1e-4)
    assert _as_set(brute_force_pairs(x, TAU, 512, "cpu")) == _as_set(brute_force_pairs(x, TAU, 512, "cuda"))
