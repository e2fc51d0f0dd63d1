"""Regurgitation audit: planted copies are flagged, novel images are not, IVF agrees with exact search."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.audit.search import AUDIT_SCHEMA, AuditConfig, audit, discover_generated, ivf_nlist, nearest_training


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
    table = audit(gen_ids, [f[2] for f in found], gen_x, train_ids, train_x, kept, cfg, cfg.resolved_threshold(0.9))

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


def test_threshold_resolution_and_validation() -> None:
    assert AuditConfig().resolved_threshold(0.93) == 0.93
    assert AuditConfig(threshold=0.8).resolved_threshold(0.93) == 0.8
    with pytest.raises(ValueError, match="top_k"):
        AuditConfig(top_k=0)
    with pytest.raises(ValueError, match="cosine"):
        AuditConfig(threshold=1.5)
    with pytest.raises(ValueError, match="nprobe"):
        AuditConfig(nprobe=0)


def test_unnormalized_or_misaligned_inputs_are_refused() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="L2-normalized"):
        audit(["g"], [None], 2 * x[:1], ["a", "b", "c", "d"], x, [], AuditConfig(), 0.9)
    with pytest.raises(ValueError, match="one entry per generated image"):
        audit(["g", "h"], [None], x[:1], ["a", "b", "c", "d"], x, [], AuditConfig(), 0.9)
    with pytest.raises(ValueError, match="differ in length"):
        audit(["g"], [None], x[:1], ["a"], x, [], AuditConfig(), 0.9)


def test_fewer_training_images_than_k() -> None:
    x = np.eye(3, dtype=np.float32)
    sims, idx = nearest_training(x[:1], x[:2], k=5)
    assert idx.tolist() == [[0, 1]] and sims[0, 0] == pytest.approx(1.0)
    sims, idx = nearest_training(x[:1], np.zeros((0, 3), np.float32), k=5)
    assert idx.shape == (1, 0)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_finds_the_same_top1_as_flat_above_flat_max() -> None:
    rng = np.random.default_rng(11)
    train = _unit(rng.standard_normal((4000, 32)))
    src = rng.choice(4000, 60, replace=False)
    queries = _unit(train[src] + 0.05 * rng.standard_normal((60, 32)))

    flat_s, flat_i = nearest_training(queries, train, k=3, flat_max=10_000)
    ivf_s, ivf_i = nearest_training(queries, train, k=3, flat_max=1000, nprobe=8)
    assert ivf_nlist(4000) < 4000 // 39 + 1
    assert flat_i[:, 0].tolist() == src.tolist()
    assert ivf_i[:, 0].tolist() == flat_i[:, 0].tolist()
    np.testing.assert_allclose(ivf_s[:, 0], flat_s[:, 0], atol=1e-5)

    # Probing every list makes IVF exhaustive: identical top-k even for unrelated random queries.
    far = _unit(rng.standard_normal((30, 32)))
    nlist = ivf_nlist(4000)
    _, fi = nearest_training(far, train, k=3, flat_max=10_000)
    _, ii = nearest_training(far, train, k=3, flat_max=1000, nprobe=nlist)
    assert ii.tolist() == fi.tolist()
