"""The pair-search kernel: blocked search == brute force (within and cross), thresholds, devices."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup import kernels
from dedup_assets.dedup.kernels import block_comparisons, block_pairs, describe_backend, resolve_device
from dedup_assets.dedup.synthetic import make_embeddings

TAU = 0.9


def _data(n: int, d: int = 32, seed: int = 1) -> np.ndarray:
    x, _ = make_embeddings(n, d=d, seed=seed, n_topics=3, dup_fraction=0.2, chain_fraction=0.05)
    return x


def _brute(a: np.ndarray, b: np.ndarray | None, tau: float) -> set[tuple[int, int]]:
    """Reference in float64: every (i, j) with cosine >= tau (i < j when b is None)."""
    s = a.astype(np.float64) @ (a if b is None else b).T.astype(np.float64)
    ok = s >= tau
    if b is None:
        ok &= np.triu(np.ones(s.shape, dtype=bool), k=1)
    p, q = np.nonzero(ok)
    return set(zip(p.tolist(), q.tolist()))


def _far_from(a: np.ndarray, b: np.ndarray | None, tau: float, gap: float = 1e-5) -> None:
    # Precondition: no similarity so close to tau that float32 rounding could decide it.
    s = a.astype(np.float64) @ (a if b is None else b).T.astype(np.float64)
    if b is None:
        s = s[np.triu_indices(len(a), 1)]
    assert np.min(np.abs(s - tau)) > gap


def _well_formed(i: np.ndarray, j: np.ndarray, s: np.ndarray, within: bool) -> None:
    assert i.dtype == np.int64 and j.dtype == np.int64 and s.dtype == np.float32
    assert i.shape == j.shape == s.shape
    if within:
        assert np.all(i < j)
    key = i * 10**9 + j
    assert np.all(np.diff(key) > 0), "sorted by (i, j), each pair once"


def test_within_mode_equals_brute_force_for_block_sizes_smaller_than_n() -> None:
    x = _data(500)
    _far_from(x, None, TAU)
    expected = _brute(x, None, TAU)
    assert len(expected) > 100
    for block in (1, 7, 64, 499, 500, 4096):
        xs = x[:60] if block == 1 else x  # block 1 is one dot product per step: keep it small
        i, j, s = block_pairs(xs, None, TAU, device="cpu", block_size=block)
        _well_formed(i, j, s, within=True)
        assert set(zip(i.tolist(), j.tolist())) == (_brute(xs, None, TAU) if block == 1 else expected), block
        np.testing.assert_allclose(s, np.einsum("ij,ij->i", xs[i], xs[j]), atol=1e-5)


def test_cross_mode_equals_brute_force_and_keeps_both_directions() -> None:
    x = _data(700, seed=2)
    a, b = x[:300], x[250:]  # 50 shared rows: each matches itself in b (cosine 1)
    _far_from(a, b[50:], TAU)
    expected = _brute(a, b, TAU)
    assert {(250 + k, k) for k in range(50)} <= expected
    for block in (13, 128, 1000):
        i, j, s = block_pairs(a, b, TAU, device="cpu", block_size=block)
        _well_formed(i, j, s, within=False)
        assert set(zip(i.tolist(), j.tolist())) == expected, block
        np.testing.assert_allclose(s, np.einsum("ij,ij->i", a[i], b[j]), atol=1e-5)
    # Asymmetric shapes: fewer a rows than one block, more b rows than several.
    i, j, _ = block_pairs(a[:5], b, TAU, block_size=64)
    assert set(zip(i.tolist(), j.tolist())) == _brute(a[:5], b, TAU)


def test_threshold_edges() -> None:
    x = _data(40, d=8, seed=3)
    n = len(x)
    # τ = -1: every pair (cosines of unit vectors are >= -1 up to rounding; the data keeps > -1).
    i, j, _ = block_pairs(x, None, -1.0, block_size=16)
    assert len(i) == n * (n - 1) // 2
    i, j, _ = block_pairs(x[:10], x[10:], -1.0, block_size=16)
    assert len(i) == 10 * (n - 10)
    # τ = 1: exact copies only (a row equals itself in float32, so its dot product is the same
    # float32 sum on both sides; a copy counts when its dot product rounds to >= 1).
    y = np.vstack([x[:5], x[:5]])
    i, j, s = block_pairs(y, None, 1.0 - 1e-6, block_size=3)
    assert set(zip(i.tolist(), j.tolist())) == {(k, k + 5) for k in range(5)}
    # A pair exactly at τ counts (>=); one float32 step below it does not.
    e = np.eye(3, 4, dtype=np.float32)
    c = np.float32(0.6)
    e[1] = [c, np.float32(0.8), 0, 0]  # cosine with e[0] is exactly 0.6 in float32
    got = block_pairs(e, None, float(c), block_size=2)
    assert list(zip(got[0].tolist(), got[1].tolist())) == [(0, 1)]
    above = float(np.nextafter(c, np.float32(1)))
    assert len(block_pairs(e, None, above, block_size=2)[0]) == 0


def test_empty_and_tiny_inputs() -> None:
    for n in (0, 1):
        i, j, s = block_pairs(np.zeros((n, 4), np.float32), None, TAU)
        assert i.shape == j.shape == s.shape == (0,) and i.dtype == np.int64 and s.dtype == np.float32
    i, j, s = block_pairs(np.eye(2, 4, dtype=np.float32), np.zeros((0, 4), np.float32), 0.0)
    assert len(i) == 0
    i, j, s = block_pairs(np.eye(2, 4, dtype=np.float32), np.eye(1, 4, dtype=np.float32), 0.5)
    assert (i.tolist(), j.tolist(), s.tolist()) == ([0], [0], [1.0])


def test_invalid_arguments_say_what_to_change() -> None:
    x = np.eye(3, 4, dtype=np.float32)
    with pytest.raises(ValueError, match="block_size"):
        block_pairs(x, None, 0.5, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        block_pairs(x, None, 1.5)
    with pytest.raises(ValueError, match="threshold"):
        block_pairs(x, None, float("nan"))
    with pytest.raises(ValueError, match="b must be"):
        block_pairs(x, np.eye(3, 5, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        block_pairs(x[0], None, 0.5)
    with pytest.raises(ValueError, match="device"):
        block_pairs(x, None, 0.5, device="tpu")


def test_block_comparisons_counts_the_grid() -> None:
    for n, block in ((600, 7), (600, 64), (600, 600), (600, 4096), (5, 1), (0, 3), (10, 3)):
        grid = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in kernels._grid(n, None, block))
        assert block_comparisons(n, None, block) == grid
        assert n * (n - 1) // 2 <= grid <= n * n
    assert block_comparisons(600, None, 600) == 600 * 600
    assert block_comparisons(30, 70, 8) == 30 * 70


def test_device_resolution_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_torch_cuda_count", lambda: 0)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError, match="use device='auto' or 'cpu'"):
            resolve_device(asked)
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(ValueError, match="cuda:N"):
            resolve_device(bad)


def test_device_resolution_with_gpus_picks_one_per_process(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(kernels, "_has_gpu_node", lambda: True)
    monkeypatch.setattr(kernels, "_torch_cuda_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:0"
    with pytest.raises(RuntimeError, match="only 1 GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(kernels, "_torch_cuda_count", lambda: 4)
    assert resolve_device("cuda:3") == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    # Lock files: a second claimant (another process; here a fresh claim table) takes the next GPU.
    monkeypatch.setattr(kernels, "_claimed", {})
    first = kernels.claim_gpu_index(4, str(tmp_path))
    assert first == 0
    assert kernels.claim_gpu_index(4, str(tmp_path)) == 0  # fixed for the life of the process
    held = kernels._claimed["file"]
    monkeypatch.setattr(kernels, "_claimed", {})
    assert kernels.claim_gpu_index(4, str(tmp_path)) == 1
    held.close()  # type: ignore[union-attr]
    kernels._claimed["file"].close()  # type: ignore[union-attr]
    monkeypatch.setattr(kernels, "_claimed", {})
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert kernels.claim_gpu_index(4, str(tmp_path)) == 2


def test_describe_backend_names_device_and_faiss_build() -> None:
    line = describe_backend("cpu")
    assert line.startswith("device cpu")
    assert "faiss" in line
    with pytest.raises(ValueError, match="device"):
        describe_backend("tpu")


@pytest.mark.gpu
def test_cuda_path_returns_the_cpu_pairs() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x = _data(3000, d=64, seed=4)
    for b, block in ((None, 256), (None, 4096), (x[:1000], 300)):
        cpu = block_pairs(x, b, TAU, device="cpu", block_size=block)
        gpu = block_pairs(x, b, TAU, device="cuda", block_size=block)
        assert set(zip(cpu[0].tolist(), cpu[1].tolist())) == set(zip(gpu[0].tolist(), gpu[1].tolist()))
        np.testing.assert_allclose(cpu[2], gpu[2], atol=1e-5)


def test_fp16_margin_covers_the_measured_fp16_error() -> None:
    # The bound at d = 512 (the CLIP width) and its growth with d.
    assert 1.5e-3 < kernels.fp16_margin(512) / 2 < 1.6e-3
    assert kernels.fp16_margin(64) < kernels.fp16_margin(512) < kernels.fp16_margin(4096) < 0.01
    assert kernels.fp16_margin(512, norm=2.0) > 3.9 * kernels.fp16_margin(512)
    with pytest.raises(ValueError):
        kernels.fp16_margin(0)
    # The fp16 similarities of unit rows never fall more than the margin below the exact ones.
    for d in (16, 512):
        x = _data(400, d=d, seed=9)
        h = x.astype(np.float16)
        s16 = (h.astype(np.float32) @ h.T.astype(np.float32)).astype(np.float16).astype(np.float64)
        exact = x.astype(np.float64) @ x.T.astype(np.float64)
        assert np.max(exact - s16) < kernels.fp16_margin(d) / 2
    # Rounding a threshold to fp16 never moves it up.
    for v in (0.9, 0.909, -0.3, 0.1234567):
        f = kernels._fp16_floor(v)
        assert f <= v and float(np.nextafter(np.float16(f), np.float16(np.inf))) > v


def test_torch_fp16_path_on_the_cpu_device_returns_the_brute_force_pairs() -> None:
    torch = pytest.importorskip("torch")
    x = _data(600, d=64, seed=5)
    # A dense cluster (many candidates per block: the float32 GEMM branch) next to sparse data
    # (few candidates: the gather branch).
    rng = np.random.default_rng(0)
    near = x[:1] + rng.normal(0, 1, (40, 64)).astype(np.float32) * 0.06
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    y = np.vstack([x, near]).astype(np.float32)
    # τ between the fp16 and the float32 similarity of the pair that fp16 underrates most: a
    # search without the margin misses that pair, the re-scored one must find it.
    t = torch.from_numpy(y)
    s16 = (t.half() @ t.half().T).float().numpy().astype(np.float64)
    s32 = y.astype(np.float64) @ y.T.astype(np.float64)
    iu = np.triu_indices(len(y), 1)
    under = np.where(s32[iu] > 0.8, s32[iu] - s16[iu], -1.0)
    k = int(np.argmax(under))
    assert under[k] > 1e-4
    tau = float(np.float32((s32[iu][k] + s16[iu][k]) / 2))
    _far_from(y, None, tau, gap=1e-6)
    expected = block_pairs(y, None, tau, device="cpu", block_size=128)
    for block, panel in ((128, None), (128, 256), (50, 100), (700, None)):
        got = kernels._torch_pairs(y, None, tau, "cpu", block, panel_rows=panel, flush_pairs=7)
        _well_formed(*got, within=True)
        assert set(zip(got[0].tolist(), got[1].tolist())) == set(zip(expected[0].tolist(), expected[1].tolist()))
        np.testing.assert_allclose(got[2], expected[2], atol=1e-5)
    a, b = y[:300], y[200:]
    want = block_pairs(a, b, tau, device="cpu", block_size=64)
    for panel in (None, 128):
        got = kernels._torch_pairs(a, b, tau, "cpu", 64, panel_rows=panel)
        assert set(zip(got[0].tolist(), got[1].tolist())) == set(zip(want[0].tolist(), want[1].tolist()))
    with pytest.raises(ValueError, match="multiple of block_size"):
        kernels._torch_pairs(y, None, tau, "cpu", 64, panel_rows=100)


def test_fp32_matmul_precision_restores_the_process_settings() -> None:
    torch = pytest.importorskip("torch")
    matmul = torch.backends.cuda.matmul
    before = (getattr(matmul, "fp32_precision", None), matmul.allow_fp16_reduced_precision_reduction)
    with kernels.fp32_matmul_precision():
        if hasattr(matmul, "fp32_precision"):
            assert matmul.fp32_precision == "ieee"
        assert matmul.allow_fp16_reduced_precision_reduction is False
    assert (getattr(matmul, "fp32_precision", None), matmul.allow_fp16_reduced_precision_reduction) == before
