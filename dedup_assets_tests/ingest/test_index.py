"""The per-shard index frame: schema, one row per image file, folder = tar, serial = parallel."""

import hashlib
import json
import os
from pathlib import Path

import duckdb
import polars as pl
import pytest

from dedup_assets.ingest.decode import DecodeLimits
from dedup_assets.ingest.index import INDEX_SCHEMA, index_shard, summarize_index
from dedup_assets.ingest.shards import Shard, find_shard, read_location
from dedup_assets.synth.hostile import hostile_files, write_folder_shard, write_tar_shard

H = hostile_files()
CAPTIONS = {"cmyk": "a cmyk gradient", "sub/deeper/nested": "nested caption"}
METAS = {
    "cmyk": {"url": "https://example.org/c.jpg", "z": 1, "a": [1, 2]},
    "image": {"caption": "from json", "url": "https://example.org/i.webp"},
    "exif_rotated": {"caption": "lone surrogate \ud800 from a JSON escape"},
}


def _dataset(root: Path) -> tuple[Shard, Shard]:
    files = dict(H)
    files["sub/deeper/nested.jpg"] = H["cmyk.jpg"]
    files["dup.jpg"] = H["image.webp"]
    files["dup.png"] = H["gray16.png"]
    write_folder_shard(root / "f", files, CAPTIONS, METAS)
    (root / "f" / "animated.json").write_text("{not json")
    write_tar_shard(root / "t.tar", files, CAPTIONS, METAS)
    return find_shard(root, "f"), find_shard(root, "t")


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    f, t = _dataset(tmp_path_factory.mktemp("data"))
    return {"folder": index_shard(f), "tar": index_shard(t)}


def test_schema_is_exact_and_rows_are_sorted_and_unique(frames: dict[str, pl.DataFrame]) -> None:
    for df in frames.values():
        assert list(df.schema.items()) == list(INDEX_SCHEMA.items())
        assert df.height == len(H) + 3  # every image file, failures included
        assert df["image_id"].to_list() == sorted(df["image_id"].to_list())
        assert df["image_id"].n_unique() == df.height


def test_folder_and_tar_give_the_same_rows_except_the_location(frames: dict[str, pl.DataFrame]) -> None:
    f, t = frames["folder"], frames["tar"]
    cols = [c for c in INDEX_SCHEMA if c not in ("image_id", "shard", "location", "error")]
    assert f.select(cols).equals(t.select(cols))
    assert t["location"].str.contains("t.tar::", literal=True).all()


def test_rows_carry_sidecars_hashes_and_probe_results(frames: dict[str, pl.DataFrame]) -> None:
    df = frames["folder"]
    rows = {r["key"]: r for r in df.iter_rows(named=True)}
    assert rows["cmyk"]["image_id"] == "f/cmyk" and rows["cmyk"]["shard"] == "f"
    assert rows["cmyk"]["caption"] == "a cmyk gradient" and rows["cmyk"]["url"] == "https://example.org/c.jpg"
    assert rows["cmyk"]["metadata"] == '{"a": [1, 2], "url": "https://example.org/c.jpg", "z": 1}'
    assert rows["image"]["caption"] == "from json" and json.loads(rows["image"]["metadata"])["caption"] == "from json"
    # image.webp and image.tiff share a base: .webp comes first in IMAGE_EXTENSIONS and keeps it.
    assert (rows["image"]["format"], rows["image.tiff"]["format"]) == ("WEBP", "TIFF")
    assert rows["image.tiff"]["caption"] == "from json"
    assert rows["exif_rotated"]["caption"] == "lone surrogate \ufffd from a JSON escape"
    assert rows["sub/deeper/nested"]["caption"] == "nested caption"
    assert rows["tiny"]["caption"] is None and rows["tiny"]["metadata"] is None
    assert (rows["dup"]["format"], rows["dup.png"]["format"], rows["dup.png"]["mode"]) == ("WEBP", "PNG", "I;16")
    assert (rows["exif_rotated"]["width"], rows["exif_rotated"]["height"]) == (32, 64)
    assert rows["animated"]["status"] == "ok" and rows["animated"]["error"].startswith("sidecar: bad json sidecar")
    assert (rows["empty"]["status"], rows["empty"]["bytes"]) == ("empty_file", 0)
    assert rows["empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    rejected = {"truncated": "truncated", "text_named": "not_an_image", "bomb": "decompression_bomb", "tiny": "too_small"}
    for name, status in rejected.items():
        assert rows[name]["status"] == status and rows[name]["error"]
    for r in rows.values():  # bytes and hash are the file's, and the location reads it back
        data = read_location(r["location"])
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"]


def test_the_frame_is_storable_in_duckdb(frames: dict[str, pl.DataFrame]) -> None:
    df = pl.concat(frames.values())
    con = duckdb.connect()
    con.register("df", df.to_arrow())
    con.execute("CREATE TABLE image_index AS SELECT * FROM df")
    back = con.execute("SELECT image_id, caption FROM image_index ORDER BY image_id").fetchall()
    assert len(back) == df.height and ("f/exif_rotated", "lone surrogate \ufffd from a JSON escape") in back


def test_summary_counts(frames: dict[str, pl.DataFrame]) -> None:
    s = summarize_index(frames["folder"])
    assert s["rows"] == len(H) + 3 and s["ok"] == s["rows"] - 5
    assert s["rejected_by_reason"] == {
        "decompression_bomb": 1, "empty_file": 1, "not_an_image": 1, "too_small": 1, "truncated": 1,
    }
    extra = len(H["cmyk.jpg"]) + len(H["image.webp"]) + len(H["gray16.png"])  # nested.jpg, dup.jpg, dup.png
    assert s["total_bytes"] == sum(len(v) for v in H.values()) + extra
    assert s["with_caption"] == 5 and s["with_url"] == 3  # image.webp and image.tiff share a base
    empty = summarize_index(pl.DataFrame(schema=INDEX_SCHEMA))
    assert empty["rows"] == 0 and empty["rejected_by_reason"] == {}


def test_parallel_index_equals_serial_and_reports_progress(tmp_path: Path) -> None:
    _, tar = _dataset(tmp_path)
    calls: list[int] = []
    serial = index_shard(tar, workers=1)
    parallel = index_shard(tar, workers=2, progress=lambda n, s: calls.append(n), progress_every=5)
    assert serial.equals(parallel)
    assert calls[-1] == serial.height and calls == sorted(calls) and len(calls) >= 2


def test_limits_reach_the_probe_and_read_failures_become_rows(tmp_path: Path) -> None:
    shard_dir = write_folder_shard(tmp_path / "s", {"a.jpg": H["cmyk.jpg"], "b.png": H["rgba.png"]})
    os.symlink(tmp_path / "nowhere.jpg", shard_dir / "gone.jpg")
    df = index_shard(find_shard(tmp_path, "s"), limits=DecodeLimits(min_side=45))
    status = dict(zip(df["key"], df["status"]))
    assert status == {"a": "ok", "b": "too_small", "gone": "broken_link"}  # a is 64x48, b 40x30


def test_an_empty_shard_gives_an_empty_frame_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    shard = find_shard(tmp_path, "e")
    df = index_shard(shard)
    assert df.height == 0 and list(df.schema.items()) == list(INDEX_SCHEMA.items())
    with pytest.raises(ValueError, match="workers=0"):
        index_shard(shard, workers=0)
    with pytest.raises(ValueError, match="progress_every"):
        index_shard(shard, progress_every=0)
