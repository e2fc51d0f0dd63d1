"""Shard discovery, readers and decoding rules, on files made here with PIL."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.ingest.decode import DecodeError, DecodeLimits, decode_rgb, probe
from dedup_assets.ingest.index import INDEX_SCHEMA, index_shard, summarize_index
from dedup_assets.ingest.shards import (
    discover_shards,
    escape,
    find_shard,
    iter_shard,
    read_location,
    unescape,
)
from dedup_assets.synth.hostile import bomb_png, hostile_files, write_folder_shard, write_tar_shard

H = hostile_files()


def _px(img: Image.Image, xy: tuple[int, int]) -> list[int]:
    return np.asarray(img)[xy[1], xy[0]].tolist()


# ------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize(
    "name,status",
    [
        ("empty.jpg", "empty_file"),
        ("truncated.jpg", "truncated"),
        ("text_named.jpg", "not_an_image"),
        ("bomb.png", "decompression_bomb"),
        ("tiny.png", "too_small"),
        ("cmyk.jpg", "ok"),
        ("gray16.png", "ok"),
        ("animated.gif", "ok"),
        ("corrupt_exif.jpg", "ok"),
        ("image.webp", "ok"),
        ("image.tiff", "ok"),
    ],
)
def test_probe_status(name: str, status: str) -> None:
    res = probe(H[name])
    assert res.status == status, res
    assert (res.error is None) == (status == "ok")


def test_truncated_large_jpeg_is_detected_not_padded() -> None:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    assert probe(data[: len(data) * 2 // 3]).status == "truncated"
    with pytest.raises(DecodeError) as e:
        decode_rgb(data[: len(data) * 2 // 3])
    assert e.value.reason == "truncated"


def test_bomb_guard_stays_on_and_header_is_rejected_before_decoding() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    # a limit well below the header's claim rejects it from the header (no pixel data exists to decode)
    res = probe(bomb_png(5000, 5000), DecodeLimits(max_pixels=1_000_000))
    assert res.status == "decompression_bomb" and "header claims 5000x5000" in res.error
    with pytest.raises(DecodeError, match="pixels"):
        decode_rgb(bomb_png(30_000, 30_000))
    assert Image.MAX_IMAGE_PIXELS is not None  # never switched off as a side effect


def test_huge_valid_image_is_refused_within_the_memory_bound() -> None:
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000), (1, 2, 3)).save(big, "PNG")
    limits = DecodeLimits(max_pixels=4_000_000)
    assert probe(big.getvalue(), limits).status == "decompression_bomb"
    assert probe(big.getvalue()).status == "ok"


def test_modes_decode_to_correct_rgb() -> None:
    cmyk = decode_rgb(H["cmyk.jpg"])
    assert cmyk.mode == "RGB"
    assert _px(cmyk, (0, 0))[2] > 200 and _px(cmyk, (0, 0))[0] < 40  # blue corner stays blue
    g16 = decode_rgb(H["gray16.png"])
    assert _px(g16, (0, 0)) == [0, 0, 0] and _px(g16, (63, 47)) == [255, 255, 255]
    mid = np.asarray(g16)[24, :, 0]
    assert 100 < mid.mean() < 160  # scaled, not clipped to white
    pal = decode_rgb(H["palette_transparent.png"])
    assert _px(pal, (5, 5)) == [0, 255, 0] and _px(pal, (35, 5)) == [255, 255, 255]  # transparent → background
    la = decode_rgb(H["gray_alpha.png"])
    assert abs(_px(la, (0, 0))[0] - 147) <= 1  # 40 at alpha 128 over white
    rgba = decode_rgb(H["rgba.png"], DecodeLimits(background=(0, 0, 0)))
    assert _px(rgba, (3, 3)) == [0, 0, 0]  # fully transparent blue over the fixed background
    gif = decode_rgb(H["animated.gif"])
    assert _px(gif, (1, 1)) == [255, 0, 0]  # the first frame
    one = decode_rgb(H["one_bit.bmp"])
    assert sorted({tuple(p) for p in np.asarray(one).reshape(-1, 3).tolist()}) == [(0, 0, 0), (255, 255, 255)]


def test_exif_orientation_applied_and_corrupt_exif_ignored() -> None:
    res = probe(H["exif_rotated.jpg"])
    assert (res.width, res.height) == (32, 64)
    img = decode_rgb(H["exif_rotated.jpg"])
    assert img.size == (32, 64)
    top, bottom = _px(img, (16, 4)), _px(img, (16, 60))
    assert top[0] > 200 and bottom[2] > 200  # red half on top after a 90° turn
    assert probe(H["corrupt_exif.jpg"]).status == "ok"
    assert decode_rgb(H["corrupt_exif.jpg"]).size == (64, 48)


def test_target_side_decodes_smaller_but_not_below_target() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (9, 9, 9)).save(buf, "JPEG")
    img = decode_rgb(buf.getvalue(), target_side=256)
    assert min(img.size) >= 256 and max(img.size) <= 800
    png = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(png, "PNG")
    assert max(decode_rgb(png.getvalue(), target_side=100).size) <= 200


# ---------------------------------------------------------------------------- shards and keys
def test_escape_round_trips_every_byte_string() -> None:
    for raw in [b"plain", b"100%", b"caf\xc3\xa9", b"bad\xff\xfename", b"%FF literal", bytes(range(1, 256))]:
        text = escape(raw)
        text.encode("utf-8")  # printable UTF-8
        assert unescape(text) == raw
    assert escape(b"plain/name") == "plain/name"


def test_discovery_accepts_odd_names_and_rejects_invalid_partition_keys(tmp_path: Path) -> None:
    for name in ["00000", "it's shard (1)", "a,b", "x...y", ".hidden"]:
        (tmp_path / name).mkdir()
    write_tar_shard(tmp_path / "t1.tar", {"a.jpg": H["cmyk.jpg"]})
    write_tar_shard(tmp_path / "00000.tar", {"a.jpg": H["cmyk.jpg"]})
    shards, rejected = discover_shards(tmp_path)
    assert [(s.name, s.kind) for s in shards] == [("00000", "folder"), ("it's shard (1)", "folder"), ("t1", "tar")]
    reasons = {p.name: r for p, r in ((r.path, r.reason) for r in rejected)}
    assert set(reasons) == {"a,b", "x...y", "00000.tar"}
    assert "collides" in reasons["00000.tar"]
    with pytest.raises(KeyError, match="not found"):
        find_shard(tmp_path, "nope")
    with pytest.raises(FileNotFoundError):
        discover_shards(tmp_path / "missing")


def _dataset(tmp_path: Path) -> tuple[Path, Path]:
    files = dict(H)
    files["sub/deeper/nested.jpg"] = H["cmyk.jpg"]
    files["dup.jpg"] = H["image.webp"]
    files["dup.png"] = H["gray16.png"]
    caps = {"cmyk": "a cmyk gradient", "sub/deeper/nested": "nested caption"}
    metas = {"cmyk": {"url": "https://example.org/c.jpg"}, "image": {"caption": "from json", "url": "u"}}
    folder = write_folder_shard(tmp_path / "f", files, caps, metas)
    (folder / "animated.json").write_text("{not json")
    tar = write_tar_shard(tmp_path / "t.tar", files, caps, metas)
    return folder, tar


def test_folder_and_tar_shards_give_the_same_rows(tmp_path: Path) -> None:
    folder, tar = _dataset(tmp_path)
    shards, _ = discover_shards(tmp_path)
    frames = {s.kind: index_shard(s) for s in shards}
    f, t = frames["folder"], frames["tar"]
    assert list(f.schema.items()) == list(INDEX_SCHEMA.items())
    cols = ["key", "caption", "url", "bytes", "sha256", "format", "width", "height", "mode", "status"]
    assert f.select(cols).equals(t.select(cols))
    rows = {r["key"]: r for r in f.iter_rows(named=True)}
    assert rows["cmyk"]["caption"] == "a cmyk gradient" and rows["cmyk"]["url"] == "https://example.org/c.jpg"
    assert rows["image"]["caption"] == "from json"
    assert rows["sub/deeper/nested"]["caption"] == "nested caption"
    assert rows["dup"]["format"] == "WEBP" and rows["dup.png"]["mode"] == "I;16"
    assert "bad json sidecar" in rows["animated"]["error"] and rows["animated"]["status"] == "ok"
    assert rows["empty"]["status"] == "empty_file" and rows["empty"]["bytes"] == 0
    assert rows["truncated"]["status"] == "truncated"
    summary = summarize_index(f)
    assert summary["rows"] == f.height and summary["rejected_by_reason"]["too_small"] == 1
    for r in t.iter_rows(named=True):  # every location maps back to the very bytes indexed
        assert read_location(r["location"]).__len__() == r["bytes"]
    assert f["image_id"].to_list() == sorted(f["image_id"].to_list())


def test_non_utf8_file_names_survive_and_map_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shard = root / "s"
    shard.mkdir(parents=True)
    raw_name = os.fsencode(shard) + b"/caf\xe9\xff.jpg"
    with open(raw_name, "wb") as fh:
        fh.write(H["cmyk.jpg"])
    with open(os.fsencode(shard) + b"/caf\xe9\xff.txt", "wb") as fh:
        fh.write(b"latin-1 named file")
    tar_path = root / "t.tar"
    with tarfile.open(tar_path, "w", encoding="utf-8", errors="surrogateescape") as tf:
        info = tarfile.TarInfo(b"odd\xfe%name.jpg".decode("utf-8", "surrogateescape"))
        info.size = len(H["image.webp"])
        tf.addfile(info, io.BytesIO(H["image.webp"]))
    frames = {s.name: index_shard(s) for s in discover_shards(root)[0]}
    row = frames["s"].row(0, named=True)
    assert row["key"] == "caf%E9%FF" and row["image_id"] == "s/caf%E9%FF"
    assert row["caption"] == "latin-1 named file" and row["status"] == "ok"
    assert read_location(row["location"]) == H["cmyk.jpg"]
    trow = frames["t"].row(0, named=True)
    assert trow["key"] == "odd%FE%25name"
    assert read_location(trow["location"]) == H["image.webp"]
    pl.DataFrame([row, trow]).write_parquet(tmp_path / "x.parquet")  # storable as UTF-8


def test_parallel_index_equals_serial(tmp_path: Path) -> None:
    _dataset(tmp_path)
    shard = find_shard(tmp_path, "t")
    calls: list[int] = []
    serial = index_shard(shard, workers=1)
    parallel = index_shard(shard, workers=2, progress=lambda n, s: calls.append(n), progress_every=5)
    assert serial.equals(parallel)
    assert calls and calls[-1] == serial.height


def test_iter_shard_streams_records_with_bytes(tmp_path: Path) -> None:
    folder, _ = _dataset(tmp_path)
    recs = list(iter_shard(find_shard(tmp_path, "f")))
    assert {r.key for r in recs} >= {"cmyk", "sub/deeper/nested", "dup", "dup.png"}
    assert all(isinstance(r.data, bytes) for r in recs)
