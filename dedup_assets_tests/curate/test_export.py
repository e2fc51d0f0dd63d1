"""Export round trip: Parquet manifest, hard-linked shards, tar members, idempotent re-runs."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.curate.export import MARKER, export_shards
from dedup_assets.tables import KEPT_SCHEMA
from dedup_assets.ingest.shards import discover_shards, iter_shard


def _image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _make_source(root: Path) -> None:
    s0 = root / "s0"
    (s0 / "sub").mkdir(parents=True)
    (s0 / "a.jpg").write_bytes(_image_bytes(1))
    (s0 / "a.txt").write_text("a red <b>thing</b>", encoding="utf-8")
    (s0 / "b.png").write_bytes(_image_bytes(2, "PNG"))
    (s0 / "sub" / "c.jpg").write_bytes(_image_bytes(3))
    (s0 / "sub" / "c.txt").write_text("nested caption", encoding="utf-8")
    (s0 / "d.jpg").write_bytes(_image_bytes(4))
    with tarfile.open(root / "s1.tar", "w") as tf:
        for name, data in [("x.jpg", _image_bytes(5)), ("x.txt", "tar caption".encode()), ("y.jpg", _image_bytes(6))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _index(root: Path) -> pl.DataFrame:
    shards, rejected = discover_shards(root)
    assert all(r.code == "hidden" and r.path.name.startswith(".dedup-assets-export") for r in rejected)
    rows = [
        (f"{s.name}/{r.key}", s.name, r.key, r.location, r.caption, 32, 24, 1.0, None)
        for s in shards
        for r in iter_shard(s)
    ]
    return pl.DataFrame(rows, schema=KEPT_SCHEMA, orient="row")


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """path → (sha256, size, mtime_ns) of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[p.relative_to(root).as_posix()] = (digest, st.st_size, st.st_mtime_ns)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    root = tmp_path / "source"
    _make_source(root)
    index = _index(root)
    kept = index.filter(pl.col("image_id").is_in(["s0/a", "s0/b", "s0/sub/c", "s1/x"])).with_columns(
        pl.Series("weight", [1.5, 0.5, 1.0, 1.0])
    )
    return root, kept


def test_export_links_kept_images_and_leaves_the_source_alone(
    tmp_path: Path, source: tuple[Path, pl.DataFrame]
) -> None:
    root, kept = source
    before = _snapshot(root)
    out = tmp_path / "export"

    counts = export_shards(kept, out)

    assert {k: counts[k] for k in ("shards", "images", "linked", "copied", "from_tar", "captions")} == {
        "shards": 2, "images": 4, "linked": 3, "copied": 0, "from_tar": 1, "captions": 3,
    }
    files = _tree(out)
    assert sorted(f for f in files if f != MARKER) == [
        "s0/a.jpg", "s0/a.txt", "s0/b.png", "s0/sub/c.jpg", "s0/sub/c.txt", "s1/x.jpg", "s1/x.txt",
    ]
    for rel in ("s0/a.jpg", "s0/b.png", "s0/sub/c.jpg"):
        assert os.stat(out / rel).st_ino == os.stat(root / rel).st_ino, f"{rel} should be a hard link"
    assert files["s1/x.jpg"] == _image_bytes(5)
    assert files["s0/a.txt"].decode() == "a red <b>thing</b>"
    assert files["s1/x.txt"].decode() == "tar caption"
    assert _snapshot(root) == before

    # Indexing the export gives back the kept images under the same keys, with their captions.
    again = _index(out)
    assert again.select("image_id", "caption").sort("image_id").equals(
        kept.select("image_id", "caption").sort("image_id")
    )


def test_rerun_is_idempotent_and_replaces_only_its_own_folder(
    tmp_path: Path, source: tuple[Path, pl.DataFrame]
) -> None:
    root, kept = source
    before = _snapshot(root)
    out = tmp_path / "export"
    export_shards(kept, out)
    first = _tree(out)

    export_shards(kept, out)
    assert _tree(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "source"]  # no staging leftovers

    # A smaller kept set replaces the whole export, not merges into it.
    export_shards(kept.filter(pl.col("shard") == "s1"), out)
    assert sorted(f for f in _tree(out) if f != MARKER) == ["s1/x.jpg", "s1/x.txt"]

    # Never replaces a folder it did not write — not even the source itself.
    with pytest.raises(FileExistsError, match="refusing"):
        export_shards(kept, root)
    assert _snapshot(root) == before


def test_copy_mode_writes_independent_files(tmp_path: Path, source: tuple[Path, pl.DataFrame]) -> None:
    root, kept = source
    out = tmp_path / "copies"
    counts = export_shards(kept, out, link=False)
    assert (counts["linked"], counts["copied"], counts["from_tar"]) == (0, 3, 1)
    assert os.stat(out / "s0/a.jpg").st_ino != os.stat(root / "s0/a.jpg").st_ino
    assert (out / "s0/a.jpg").read_bytes() == (root / "s0/a.jpg").read_bytes()


def test_other_device_falls_back_to_copies(tmp_path: Path, source: tuple[Path, pl.DataFrame]) -> None:
    root, kept = source
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to export across")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        counts = export_shards(kept, Path(other) / "export")
        assert (counts["linked"], counts["copied"]) == (0, 3)
        assert (Path(other) / "export/s0/b.png").read_bytes() == (root / "s0/b.png").read_bytes()
