"""k-means clusterings: the K rule, config validation, different subsets, tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.kmeans import (
    ClusteringConfig,
    assign,
    assign_many,
    choose_k,
    default_subset_size,
    fit_clusterings,
)
from dedup_assets.dedup import kmeans
from dedup_assets.embed.base import l2_normalize
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


def test_cuda_without_a_gpu_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from dedup_assets.dedup import kernels

    monkeypatch.setattr(kernels, "_torch_cuda_count", lambda: 0)
    with pytest.raises(RuntimeError, match="device='cuda'"):
        fit_clusterings(np.eye(4, dtype=np.float32), ClusteringConfig(device="cuda"))
    with pytest.raises(RuntimeError, match="device='cuda:1'"):
        assign(np.eye(4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), soft=True, device="cuda:1")
    assert ClusteringConfig(device="cuda:3").device == "cuda:3"  # validated, resolved when used


def test_missing_faiss_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(RuntimeError, match=r"\.\[cpu\]"):
        assign(np.eye(4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), soft=False, device="cpu")


def _blobs(n_blobs: int, per: int, d: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((d, n_blobs)))[0].T.astype(np.float32)  # orthogonal
    truth = np.repeat(np.arange(n_blobs), per)
    x = centers[truth] + spread * rng.standard_normal((n_blobs * per, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_torch_kmeans_matches_faiss_from_the_same_start_on_separated_data() -> None:
    pytest.importorskip("torch")
    x, truth = _blobs(8, 150, 32, 0.05, seed=0)
    init = x[[150 * b + 3 for b in range(8)]]  # one start per blob
    c_faiss = l2_normalize(kmeans._faiss_kmeans(x, 8, 10, seed=0, init=init.copy()))
    c_torch = l2_normalize(kmeans._torch_kmeans(x, 8, 10, seed=0, device="cpu", init=init.copy()))
    np.testing.assert_allclose(c_torch, c_faiss, atol=1e-4)
    l_faiss, _ = assign(x, c_faiss, soft=False, device="cpu")
    l_torch = kmeans._torch_assign_many(x, [c_torch], soft=False, device="cpu")[0][0]
    assert np.array_equal(l_faiss, l_torch)
    assert _same_partition(l_torch, truth)


def test_torch_kmeans_inertia_is_close_to_faiss_on_random_data() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def objective(c: np.ndarray) -> float:  # mean cosine to the nearest centroid
        return float(np.mean(np.max(x @ c.T, axis=1)))

    for seed in (0, 1):
        f = objective(l2_normalize(kmeans._faiss_kmeans(x, 32, 15, seed=seed)))
        t_c = kmeans._torch_kmeans(x, 32, 15, seed=seed, device="cpu")
        np.testing.assert_allclose(np.linalg.norm(t_c, axis=1), 1.0, atol=1e-5)
        t = objective(t_c)
        assert abs(t - f) / f < 0.02, (seed, t, f)
        assert t > objective(x[:32]) + 0.01  # the iterations improve on the initial points
    # Empty clusters are re-seeded: k equal to the number of distinct points still gives k centroids.
    dup = np.repeat(x[:6], 3, axis=0)
    c = kmeans._torch_kmeans(dup, 6, 5, seed=0, device="cpu")
    assert np.unique(np.round(c, 4), axis=0).shape[0] == 6


def test_assign_many_equals_one_assign_per_clustering_on_both_backends() -> None:
    pytest.importorskip("torch")
    x, _ = make_embeddings(3000, d=64, seed=2)
    rng = np.random.default_rng(3)
    sets = [l2_normalize(x[rng.choice(len(x), k, replace=False)]) for k in (16, 7, 1, 40)]
    for soft in (True, False):
        many = assign_many(x, sets, soft=soft, device="cpu")
        torch_many = kmeans._torch_assign_many(x, sets[:2] + sets[3:], soft=soft, device="cpu")
        for t, c in enumerate(sets):
            one = assign(x, c, soft=soft, device="cpu")
            assert np.array_equal(many[t][0], one[0])
            assert (many[t][1] is None) == (not soft)
            s = x @ c.T
            if c.shape[0] > 1:
                top = np.argsort(-s, axis=1)[:, :2]
                assert np.mean(top[:, 0] == many[t][0]) > 0.999
                got = torch_many[[0, 1, None, 2][t]]
                assert np.mean(got[0] == many[t][0]) > 0.999  # ties aside, the same argmax
                if soft:
                    assert np.mean(got[1] == many[t][1]) > 0.999
                    assert np.mean(top[:, 1] == many[t][1]) > 0.99
    # Small chunks (many GEMMs) give the same labels as one big one.
    small = kmeans._chunk_rows
    try:
        kmeans._chunk_rows = lambda k_total, budget_floats=0: 97
        chunked = kmeans._torch_assign_many(x, sets[:2], soft=True, device="cpu")
    finally:
        kmeans._chunk_rows = small
    whole = kmeans._torch_assign_many(x, sets[:2], soft=True, device="cpu")
    for (a1, a2), (b1, b2) in zip(chunked, whole):
        assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    with pytest.raises(ValueError, match="dimension"):
        assign_many(x, [np.eye(3, 8, dtype=np.float32)])


@pytest.mark.gpu
def test_gpu_kmeans_and_assignment_match_the_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x, truth = _blobs(8, 500, 64, 0.05, seed=0)
    init = x[[500 * b + 3 for b in range(8)]]
    c_cpu = l2_normalize(kmeans._faiss_kmeans(x, 8, 10, seed=0, init=init.copy()))
    c_gpu = l2_normalize(kmeans._torch_kmeans(x, 8, 10, seed=0, device="cuda", init=init.copy()))
    np.testing.assert_allclose(c_gpu, c_cpu, atol=1e-4)
    y, _ = make_embeddings(20000, d=64, seed=1)
    sets = [c_cpu, l2_normalize(y[:300])]
    for (g1, g2), (c1, c2) in zip(assign_many(y, sets, True, "cuda"), assign_many(y, sets, True, "cpu")):
        assert np.mean(g1 == c1) > 0.9999 and np.mean(g2 == c2) > 0.999
    # a whole fit on the GPU is as good as the CPU's: same mean similarity of a row to its centroid
    fitted = fit_clusterings(y, ClusteringConfig(n_clusterings=2, k=32, niter=5, device="cuda"))
    on_cpu = fit_clusterings(y, ClusteringConfig(n_clusterings=2, k=32, niter=5, device="cpu"))
    for g, c in zip(fitted, on_cpu):
        fit_g = float((y * g.centroids[g.labels]).sum(1).mean())
        fit_c = float((y * c.centroids[c.labels]).sum(1).mean())
        assert g.labels.shape == c.labels.shape == (20000,) and abs(fit_g - fit_c) < 0.01 * abs(fit_c), (fit_g, fit_c)


def test_split_large_clusters_bounds_the_largest_cluster() -> None:
    from dedup_assets.dedup.kmeans import split_large_clusters

    rng = np.random.default_rng(0)
    d = 16
    # one dense blob holding 60 % of the points, plus 40 small scattered blobs
    centers = [rng.standard_normal(d) for _ in range(41)]
    pts = [centers[0] + 0.05 * rng.standard_normal((3000, d))]
    for c in centers[1:]:
        pts.append(c + 0.05 * rng.standard_normal((50, d)))
    x = np.concatenate(pts).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cents = np.array(centers, dtype=np.float32)  # one centroid per blob, as a fit on a sample may leave it
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    load = np.bincount(np.argmax(x @ cents.T, axis=1), minlength=41)
    assert load.max() > 4 * x.shape[0] / cents.shape[0]  # the blob is one cluster
    split, load2 = split_large_clusters(x, cents, max_load=int(4 * x.shape[0] / cents.shape[0]), seed=0)
    assert split.shape[0] > cents.shape[0]
    assert load2.sum() == x.shape[0]
    assert load2.max() <= 4 * x.shape[0] / cents.shape[0] * 1.5
    assert np.allclose(np.linalg.norm(split, axis=1), 1.0, atol=1e-5)


def test_probe_many_adds_probes_only_within_the_margin() -> None:
    from dedup_assets.dedup.kmeans import assign_many, probe_many

    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((20, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    m = probe_many(x, [c], probes=4, margin=0.05)[0]
    l1, l2 = assign_many(x, [c], soft=True)[0]
    assert (m[:, 0] == l1).all() and (m[:, 1] == l2).all()
    s = x @ c.T
    for r in range(x.shape[0]):
        for p in (2, 3):
            if m[r, p] >= 0:
                assert s[r, m[r, p]] >= s[r, m[r, 0]] - 0.05 - 1e-6
            else:
                assert np.sort(s[r])[::-1][p] < s[r, m[r, 0]] - 0.05 + 1e-6
    assert (m[:, 2] >= 0).any() and (m[:, 2] < 0).any()
    assert (probe_many(x, [c], probes=4, margin=0.0)[0][:, 2:] < 0).mean() > 0.99
