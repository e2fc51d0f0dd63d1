"""Regurgitation audit: planted copies are flagged, novel images are not, the streamed top-k equals exact search."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.audit.search import (
    AUDIT_SCHEMA,
    AuditConfig,
    StreamedTopK,
    audit_table,
    discover_generated,
    streamed_top_k,
)


def tiny_embed(images: list[Image.Image]) -> np.ndarray:
    """A deterministic stand-in embedder for this test only: the 16×16 grayscale thumbnail,
    zero-mean, L2-normalized (near-copies stay close; unrelated patterns are near-orthogonal)."""
    rows = []
    for im in images:
        v = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
        v -= v.mean()
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows).astype(np.float32)


def pattern(seed: int) -> Image.Image:
    """A smooth random colour pattern, 64×64."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((64, 64), Image.Resampling.BICUBIC)


def web_copy(img: Image.Image, quality: int = 70) -> Image.Image:
    """A resized, re-encoded copy, as a model might regurgitate it."""
    buf = io.BytesIO()
    img.resize((48, 48), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def batches(ids: list[str], x: np.ndarray, size: int):
    """(ids, vectors) batches of at most `size` rows, in order — what EmbeddingStore.iter_batches yields."""
    for s in range(0, len(ids), size):
        yield ids[s : s + size], x[s : s + size]


def test_copies_are_flagged_novel_images_are_not(tmp_path: Path) -> None:
    train_ids = [f"s0/{i:03d}" for i in range(40)]
    train_x = tiny_embed([pattern(i) for i in range(40)])
    # s0/007 was removed by dedup/filtering; the audit must still find it.
    kept = pl.Series("image_id", [t for t in train_ids if t != "s0/007"])

    gen = tmp_path / "generated"
    (gen / "batch2").mkdir(parents=True)
    web_copy(pattern(3)).save(gen / "copy_a.png")
    (gen / "copy_a.txt").write_text("  a prompt that <script>leaks</script>\n", encoding="utf-8")
    web_copy(pattern(7)).save(gen / "batch2" / "copy_b.jpg")
    pattern(1001).save(gen / "novel_a.png")
    pattern(1002).save(gen / "batch2" / "novel_b.webp")
    (gen / "notes.md").write_text("not an image")
    pattern(3).save(gen / ".hidden.png")

    found = discover_generated(gen)
    assert [f[0] for f in found] == ["batch2/copy_b.jpg", "batch2/novel_b.webp", "copy_a.png", "novel_a.png"]
    assert dict((f[0], f[2]) for f in found)["copy_a.png"] == "a prompt that <script>leaks</script>"
    assert dict((f[0], f[2]) for f in found)["novel_a.png"] is None

    gen_ids = [f[0] for f in found]
    gen_x = tiny_embed([Image.open(f[1]) for f in found])
    cfg = AuditConfig(top_k=3)
    top = streamed_top_k(gen_x, batches(train_ids, train_x, 7), cfg.top_k)
    table = audit_table(gen_ids, [f[2] for f in found], top, kept, 0.9)

    assert table.schema == pl.Schema(AUDIT_SCHEMA)
    assert table.height == 4 * 3
    assert table.group_by("generated").agg(pl.col("rank"))["rank"].to_list() == [[1, 2, 3]] * 4
    for _, rows in table.group_by("generated"):
        sims = rows.sort("rank")["similarity"].to_list()
        assert sims == sorted(sims, reverse=True)
    top = {r["generated"]: r for r in table.filter(pl.col("rank") == 1).iter_rows(named=True)}
    assert top["copy_a.png"]["image_id"] == "s0/003" and top["copy_a.png"]["flagged"]
    assert top["copy_a.png"]["kept_in_filtered"] is True
    assert top["batch2/copy_b.jpg"]["image_id"] == "s0/007" and top["batch2/copy_b.jpg"]["flagged"]
    assert top["batch2/copy_b.jpg"]["kept_in_filtered"] is False
    assert not top["novel_a.png"]["flagged"] and not top["batch2/novel_b.webp"]["flagged"]
    # Only the rank-1 rows of the copies are flagged: the other training images are unrelated.
    assert sorted(table.filter(pl.col("flagged"))["generated"].to_list()) == ["batch2/copy_b.jpg", "copy_a.png"]
    assert top["copy_a.png"]["prompt"] == "a prompt that <script>leaks</script>"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="top_k"):
        AuditConfig(top_k=0)
    with pytest.raises(ValueError, match="cosine"):
        AuditConfig(threshold=1.5)
    with pytest.raises(ValueError, match="batch_rows"):
        AuditConfig(batch_rows=0)


def test_unnormalized_or_misaligned_inputs_are_refused() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="L2-normalized"):
        StreamedTopK(2 * x[:1], 3)
    acc = StreamedTopK(x[:1], 3)
    acc.add(["a", "b"], x[:2])
    with pytest.raises(ValueError, match="row 3 has norm 2"):  # positions count over the whole stream
        acc.add(["c", "d"], np.stack([x[2], 2 * x[3]]))
    with pytest.raises(ValueError, match="one id per row"):
        acc.add(["c"], x[2:4])
    with pytest.raises(ValueError, match="dimension 3"):
        acc.add(["c"], np.eye(3, dtype=np.float32)[:1])
    with pytest.raises(ValueError, match="one entry per generated image"):
        audit_table(["g", "h"], [None, None], acc.top, [], 0.9)


def test_fewer_training_images_than_k_leaves_slots_empty() -> None:
    x = np.eye(3, dtype=np.float32)
    top = streamed_top_k(x[:1], batches(["a", "b"], x[:2], 1), k=5)
    assert top.ids[0, :2].tolist() == ["a", "b"] and top.sims[0, 0] == pytest.approx(1.0)
    assert top.filled().tolist() == [[True, True, False, False, False]]
    table = audit_table(["g"], [None], top, ["a"], 0.9)
    assert table["image_id"].to_list() == ["a", "b"] and table["kept_in_filtered"].to_list() == [True, False]
    empty = streamed_top_k(x[:1], [], k=5)
    assert not empty.filled().any() and audit_table(["g"], [None], empty, [], 0.9).height == 0


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every similarity in float64 (rounded to float32), rows sorted by
    (similarity desc, position asc) with a stable sort — no streaming, no candidates."""
    sims = (q.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_streamed_top_k_equals_exact_search_for_every_batch_size() -> None:
    rng = np.random.default_rng(11)
    n, d, k = 3000, 48, 6
    train = _unit(rng.standard_normal((n, d)))
    # Known answer: query g is a near-copy of training row src[g] (cosine ≈ 0.999).
    src = rng.choice(n, 40, replace=False)
    copies = _unit(train[src] + 0.02 * rng.standard_normal((40, d)))
    queries = np.concatenate([copies, _unit(rng.standard_normal((25, d)))])
    ids = [f"p{r // 1000}/{r:05d}" for r in range(n)]
    want_s, want_i = exact_top_k(queries, train, k)
    assert want_i[:40, 0].tolist() == src.tolist()
    for size in (1, 37, 999, n, 10 * n):  # batch sizes below, at and above N
        top = streamed_top_k(queries, batches(ids, train, size), k)
        assert top.searched == n
        assert top.pos.tolist() == want_i.tolist(), size
        np.testing.assert_array_equal(top.sims, want_s)
        assert top.ids.tolist() == [[ids[j] for j in row] for row in want_i]


def test_ties_rank_by_stream_position_whatever_the_batching() -> None:
    rng = np.random.default_rng(5)
    d = 16
    base = _unit(rng.standard_normal((4, d)))
    # Three exact copies of base[0] at positions 9, 2 and 5, and of base[1] at 7 and 0.
    train = _unit(rng.standard_normal((12, d)))
    for pos in (9, 2, 5):
        train[pos] = base[0]
    for pos in (7, 0):
        train[pos] = base[1]
    # A zero generated vector is allowed: similarity 0 to everything, a tie of every row.
    queries = np.concatenate([base[:2], np.zeros((1, d), np.float32)])
    ids = [f"t{r:02d}" for r in range(12)]
    want_s, want_i = exact_top_k(queries, train, 4)
    assert want_i[0, :3].tolist() == [2, 5, 9] and want_i[1, :2].tolist() == [0, 7]
    assert want_i[2].tolist() == [0, 1, 2, 3]
    for size in (1, 2, 3, 5, 12):
        top = streamed_top_k(queries, batches(ids, train, size), 4)
        assert top.pos.tolist() == want_i.tolist(), size
        np.testing.assert_array_equal(top.sims, want_s)


def test_flagged_rows_are_those_at_or_above_the_threshold() -> None:
    x = _unit(np.array([[1.0, 0.0, 0.0], [0.95, 0.3122499, 0.0], [0.0, 1.0, 0.0]]))
    top = streamed_top_k(x[:1], batches(["a", "b", "c"], x, 2), 3)
    table = audit_table(["g"], ["a prompt"], top, ["b", "c"], threshold=float(top.sims[0, 1]))
    assert table["image_id"].to_list() == ["a", "b", "c"]
    assert table["flagged"].to_list() == [True, True, False]  # at the threshold counts
    assert table["kept_in_filtered"].to_list() == [False, True, True]
    assert table["rank"].to_list() == [1, 2, 3] and table["prompt"].to_list() == ["a prompt"] * 3


@pytest.mark.gpu
def test_gpu_top_k_equals_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(3)
    train = _unit(rng.standard_normal((20_000, 512)))
    queries = np.concatenate([_unit(train[:50] + 0.05 * rng.standard_normal((50, 512))), train[100:110]])
    ids = [str(r) for r in range(train.shape[0])]
    cpu = streamed_top_k(queries, batches(ids, train, 4096), 5)
    gpu = streamed_top_k(queries, batches(ids, train, 4096), 5, device="cuda:0")
    assert gpu.pos.tolist() == cpu.pos.tolist()
    np.testing.assert_array_equal(gpu.sims, cpu.sims)
