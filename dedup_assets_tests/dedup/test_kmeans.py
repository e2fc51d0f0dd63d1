"""k-means clusterings: the K rule, config validation, different subsets, tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.kmeans import (
    ClusteringConfig,
    assign,
    choose_k,
    default_subset_size,
    fit_clusterings,
    resolve_faiss_device,
)
from dedup_assets.dedup.synthetic import make_embeddings


def test_choose_k_rule() -> None:
    assert choose_k(1_000_000) == 1024
    assert choose_k(100_000) == 256
    assert choose_k(20_000) == 128
    assert choose_k(10) == 4
    assert choose_k(0) == choose_k(1) == 1
    assert choose_k(2) == 2  # each of the two points its own cluster
    assert choose_k(10**12) == 16_384
    ks = [choose_k(n) for n in (10, 100, 10**3, 10**4, 10**5, 10**6, 10**7)]
    assert ks == sorted(ks)
    assert default_subset_size(1_000_000, 1024) == 40 * 1024
    assert default_subset_size(1000, 32) == 1000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_clusterings": 0}, "n_clusterings"),
        ({"n_clusterings": 9}, "8-bit"),
        ({"k": 0}, "k must be"),
        ({"subset_size": 0}, "subset_size"),
        ({"niter": 0}, "niter"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusteringConfig(**kwargs)


def test_fit_clusterings_different_subsets_and_exact_assignment() -> None:
    x, _ = make_embeddings(4000, d=64, seed=0)
    logs: list[str] = []
    cfg = ClusteringConfig(n_clusterings=3, k=16, subset_size=1000, niter=5, soft=True, device="cpu")
    fitted = fit_clusterings(x, cfg, log=logs.append)
    assert [c.index for c in fitted] == [0, 1, 2] and len(logs) == 3
    for c in fitted:
        assert c.k == 16 and c.subset_size == 1000
        assert c.centroids.shape == (16, 64) and c.centroids.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(c.centroids, axis=1), 1.0, atol=1e-5)
        assert c.labels.shape == (4000,) and c.labels.dtype == np.int32
        assert c.labels2 is not None and np.all(c.labels2 != c.labels)
        # Assignment is the exact inner-product argmax / second argmax.
        s = x @ c.centroids.T
        top = np.argsort(-s, axis=1)[:, :2]
        assert np.mean(top[:, 0] == c.labels) > 0.999
        assert np.mean(top[:, 1] == c.labels2) > 0.99
    # Different subsets (and seeds) → different boundaries.
    assert not np.allclose(fitted[0].centroids, fitted[1].centroids)
    # Label ids are arbitrary: compare partitions. Identical partitions map every cluster of
    # one clustering wholly into one cluster of the other.
    joint = np.zeros((16, 16), dtype=np.int64)
    np.add.at(joint, (fitted[0].labels, fitted[1].labels), 1)
    purity = joint.max(axis=1).sum() / 4000
    assert purity < 0.95
    # Deterministic for a fixed seed.
    again = fit_clusterings(x, cfg)
    np.testing.assert_array_equal(again[2].labels, fitted[2].labels)


def test_tiny_inputs_do_not_crash() -> None:
    cfg = ClusteringConfig(n_clusterings=2, k=32, niter=3, soft=True, device="cpu")
    for n in (0, 1, 2, 10):
        x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        fitted = fit_clusterings(x, cfg)
        assert len(fitted) == 2
        for c in fitted:
            assert c.labels.shape == (n,) and c.labels2 is not None and c.labels2.shape == (n,)
            assert c.k == min(32, n) and c.centroids.shape == (c.k, 8)
            if n:
                assert c.labels.max() < c.k
    # Automatic k on a tiny input.
    fitted = fit_clusterings(np.eye(3, 8, dtype=np.float32), ClusteringConfig(n_clusterings=1, device="cpu"))
    assert fitted[0].k == choose_k(3)


def test_assign_single_centroid_and_empty() -> None:
    x = np.eye(4, dtype=np.float32)
    labels, labels2 = assign(x, np.ones((1, 4), np.float32) / 2, soft=True)
    assert labels.tolist() == [0, 0, 0, 0] and labels2 is not None and labels2.tolist() == [0, 0, 0, 0]
    labels, labels2 = assign(x[:0], np.zeros((0, 4), np.float32), soft=False)
    assert labels.size == 0 and labels2 is None


def test_cuda_without_faiss_gpu_fails_clearly() -> None:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    assert resolve_faiss_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="device='cuda'"):
        fit_clusterings(np.eye(4, dtype=np.float32), ClusteringConfig(device="cuda"))


@pytest.mark.gpu
def test_faiss_gpu_clustering_matches_shape() -> None:
    import faiss

    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("needs the faiss GPU build and a GPU")
    x, _ = make_embeddings(5000, d=64, seed=0)
    fitted = fit_clusterings(x, ClusteringConfig(n_clusterings=2, k=32, niter=5, device="cuda"))
    assert all(c.labels.shape == (5000,) and c.k == 32 for c in fitted)
