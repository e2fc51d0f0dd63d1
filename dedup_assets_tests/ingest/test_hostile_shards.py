"""Hostile shards (issue: hardening): links out of the root, FIFOs, huge sparse files, deep JSON,
duplicate and link tar members, traversal names, hidden entries, bidi names, huge captions.

Each test makes its files here and asserts the recorded reason, that the other rows of the shard
survive, and that nothing outside the root is read. Reads that could hang run under a hard alarm.
"""

import io
import os
import signal
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from dedup_assets.ingest.index import index_shard, skipped_frame
from dedup_assets.ingest.shards import (
    ReadLimits,
    Shard,
    Skipped,
    discover_shards,
    find_shard,
    iter_shard,
    parse_location,
    read_location,
)
from dedup_assets.synth.hostile import hostile_files, write_folder_shard

H = hostile_files()
JPG, WEBP, PNG = H["cmyk.jpg"], H["image.webp"], H["gray16.png"]
CANARY = "CANARY-7f3a-outside-the-root"


@contextmanager
def hard_timeout(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than `seconds`."""

    def boom(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"hung for more than {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text(CANARY)
    (out / "photo.jpg").write_bytes(JPG)
    (out / "meta.json").write_text('{"url": "%s"}' % CANARY)
    (out / "dir").mkdir()
    (out / "dir" / "x.jpg").write_bytes(PNG)
    return out


def _index(shard: Shard, limits: ReadLimits = ReadLimits()) -> tuple[dict, list[Skipped]]:
    skipped: list[Skipped] = []
    with hard_timeout(60):
        df = index_shard(shard, read_limits=limits, skipped=skipped)
    return {r["key"]: r for r in df.iter_rows(named=True)}, skipped


# ------------------------------------------------------------------------------------ 1. links
def test_links_out_of_the_root_are_recorded_never_read(tmp_path: Path) -> None:
    out = _outside(tmp_path)
    root = tmp_path / "root"
    shard = write_folder_shard(root / "s", {"good.jpg": JPG, "inner.png": PNG}, captions={"good": "a fine caption"})
    os.symlink(out / "photo.jpg", shard / "stolen.jpg")
    os.symlink(out / "secret.txt", shard / "hostfile.jpg")
    os.symlink(out / "secret.txt", shard / "inner.txt")  # caption of inner.png
    os.symlink(out / "meta.json", shard / "good.json")
    os.symlink(out / "dir", shard / "linkdir")
    os.symlink("/etc/passwd", shard / "passwd.jpg")
    rows, skipped = _index(find_shard(root, "s"))
    assert rows["good"]["status"] == "ok" and rows["good"]["caption"] == "a fine caption"
    assert rows["inner"]["status"] == "ok"
    for key in ("stolen", "hostfile", "passwd"):
        assert rows[key]["status"] == "outside_root", key
        assert rows[key]["sha256"] is None and rows[key]["bytes"] == 0
    assert rows["inner"]["caption"] is None and "outside_root" in rows["inner"]["error"]
    assert rows["good"]["metadata"] is None and "outside_root" in rows["good"]["error"]
    assert ("linkdir", "outside_root") in {(s.entry, s.reason) for s in skipped}
    dump = repr(rows) + repr(skipped)
    assert CANARY not in dump and "root:x:0:0" not in dump


def test_links_inside_the_root_are_followed_by_default_and_never_on_request(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_folder_shard(root / "a", {"x.jpg": JPG}, captions={"x": "caption of x"})
    b = write_folder_shard(root / "b", {"own.png": PNG})
    os.symlink(root / "a" / "x.jpg", b / "alias.jpg")
    os.symlink(root / "a", b / "sub")  # a folder inside the root
    os.symlink(b, b / "loop")  # a loop
    rows, skipped = _index(find_shard(root, "b"))
    assert rows["alias"]["status"] == "ok"
    assert parse_location(rows["alias"]["location"]).path == os.fsencode((root / "a" / "x.jpg").resolve())
    assert rows["sub/x"]["status"] == "ok" and rows["sub/x"]["caption"] == "caption of x"
    assert ("loop", "link_loop") in {(s.entry, s.reason) for s in skipped}
    rows, skipped = _index(find_shard(root, "b"), ReadLimits(follow_links="never"))
    assert rows["alias"]["status"] == "link_not_followed" and rows["own"]["status"] == "ok"
    assert "sub/x" not in rows


def test_a_shard_that_is_a_link_out_of_the_root_is_rejected(tmp_path: Path) -> None:
    out = _outside(tmp_path)
    root = tmp_path / "root"
    write_folder_shard(root / "ok", {"a.jpg": JPG})
    os.symlink(out / "dir", root / "evil")
    tar = tmp_path / "outside" / "t.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(out / "photo.jpg", arcname="p.jpg")
    os.symlink(tar, root / "eviltar.tar")
    shards, rejected = discover_shards(root)
    assert [s.name for s in shards] == ["ok"]
    assert {r.path.name: r.code for r in rejected} == {"evil": "outside_root", "eviltar.tar": "outside_root"}
    with pytest.raises(KeyError):
        find_shard(root, "evil")


def test_tar_link_members_resolve_inside_the_archive_only(tmp_path: Path) -> None:
    _outside(tmp_path)
    path = tmp_path / "root" / "t.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tf:
        for name, data in [("a.jpg", JPG), ("a.txt", b"cap")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind, target in [
            ("hard.jpg", tarfile.LNKTYPE, "a.jpg"),
            ("soft.jpg", tarfile.SYMTYPE, "a.jpg"),
            ("abs.jpg", tarfile.SYMTYPE, str(tmp_path / "outside" / "photo.jpg")),
            ("up.jpg", tarfile.SYMTYPE, "../outside/photo.jpg"),
            ("ahead.jpg", tarfile.LNKTYPE, "later.jpg"),
            ("cap.txt", tarfile.SYMTYPE, "../outside/secret.txt"),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
        info = tarfile.TarInfo("cap.jpg")
        info.size = len(PNG)
        tf.addfile(info, io.BytesIO(PNG))
    rows, _ = _index(find_shard(path.parent, "t"))
    assert rows["a"]["status"] == "ok" and rows["a"]["caption"] == "cap"
    for key in ("hard", "soft"):  # hardlinks (legitimate in tars) give their target's bytes
        assert rows[key]["status"] == "ok" and rows[key]["sha256"] == rows["a"]["sha256"]
        assert read_location(rows[key]["location"]) == JPG
    assert rows["abs"]["status"] == rows["up"]["status"] == "outside_root"
    assert rows["ahead"]["status"] == "unresolved_link"
    assert rows["cap"]["status"] == "ok" and rows["cap"]["caption"] is None
    assert "outside_root" in rows["cap"]["error"]
    assert CANARY not in repr(rows)


# ------------------------------------------------------------------------- 2. FIFOs, huge files
def test_a_fifo_and_a_huge_sparse_file_give_reasons_without_blocking_or_reading(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shard = write_folder_shard(root / "s", {"good.jpg": JPG, "capfifo.png": PNG})
    os.mkfifo(shard / "x.jpg")
    os.mkfifo(shard / "capfifo.txt")
    with open(shard / "huge.jpg", "wb") as f:  # 10 GB, sparse: costs no disk
        f.truncate(10 * 2**30)
    t0 = time.perf_counter()
    rows, _ = _index(find_shard(root, "s"), ReadLimits(max_file_bytes=50 * 2**20))
    assert time.perf_counter() - t0 < 30  # a generous bound: reading 10 GB would take minutes
    assert rows["x"]["status"] == "not_a_regular_file" and "FIFO" in rows["x"]["error"]
    assert rows["huge"]["status"] == "too_large_file" and str(10 * 2**30) in rows["huge"]["error"]
    assert rows["capfifo"]["status"] == "ok" and "not_a_regular_file" in rows["capfifo"]["error"]
    assert rows["good"]["status"] == "ok"


def test_read_location_never_blocks_or_reads_past_the_cap(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.jpg")
    with open(tmp_path / "big.jpg", "wb") as f:
        f.truncate(2**30)
    from dedup_assets.ingest.shards import FileProblem, folder_location

    with hard_timeout(20):
        with pytest.raises(FileProblem, match="FIFO"):
            read_location(folder_location(tmp_path / "p.jpg"))
        with pytest.raises(FileProblem) as e:
            read_location(folder_location(tmp_path / "big.jpg"), max_bytes=2**20)
    assert e.value.reason == "too_large_file"


def test_a_huge_tar_member_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("a.jpg", JPG), ("big.jpg", b"\0" * 300_000), ("c.jpg", WEBP)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows, _ = _index(Shard("t", path, "tar"), ReadLimits(max_file_bytes=100_000))
    assert rows["big"]["status"] == "too_large_file"
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "ok"


# ---------------------------------------------------------------------------- 3. deep JSON
def test_deeply_nested_json_only_adds_a_note(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shard = write_folder_shard(root / "s", {"a.jpg": JPG, "b.png": PNG}, captions={"b": "b caption"})
    for depth in (600, 900):
        (shard / "a.json").write_text('{"k": ' + "[" * depth + "]" * depth + "}")
        (shard / "b.json").write_text('{"k": ' * depth + "1" + "}" * depth)
        rows, _ = _index(find_shard(root, "s"))
        assert rows["a"]["status"] == "ok" and "deeper than" in rows["a"]["error"]
        assert rows["b"]["status"] == "ok" and rows["b"]["caption"] == "b caption"
        assert "deeper than" in rows["b"]["error"] and rows["b"]["metadata"] is None
        assert len(rows["a"]["error"]) < 500


# ------------------------------------------------------------------ 4. duplicate tar members
def test_tar_members_that_share_a_name_get_their_own_locations(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("a.jpg", JPG), ("b.jpg", PNG), ("a.jpg", WEBP)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    recs = list(iter_shard(Shard("t", path, "tar")))
    assert len({r.location for r in recs}) == 3 and len({r.key for r in recs}) == 3
    for rec in recs:  # every location gives back exactly the bytes that were hashed
        assert read_location(rec.location) == rec.data
    assert {r.data for r in recs} == {JPG, PNG, WEBP}


# ------------------------------------------------------------------------ 5. silent skips
def test_every_entry_is_accounted_for(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shard = write_folder_shard(root / "s", {"a.jpg": JPG, ".hidden.jpg": JPG, "notes.md": b"x"},
                               captions={"a": "cap", "orphan": "no image"})
    (shard / ".git").mkdir()
    (shard / ".git" / "c.jpg").write_bytes(JPG)
    (root / ".cache").mkdir()
    (root / "00000.parquet").write_bytes(b"stats")
    tar = root / "t.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in [("../../x.jpg", JPG), ("ok.jpg", PNG), ("/../y.jpg", JPG), ("z.txt", b"orphan")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shards, rejected = discover_shards(root)
    assert [s.name for s in shards] == ["s", "t"]
    assert {r.path.name: r.code for r in rejected} == {".cache": "hidden", "00000.parquet": "not_a_shard"}
    rows, skipped = _index(find_shard(root, "s"))
    assert set(rows) == {"a"}
    assert {(s.entry, s.reason) for s in skipped} == {
        (".hidden.jpg", "hidden"), (".git", "hidden"), ("notes.md", "other_extension"),
        ("orphan.txt", "orphan_sidecar"),
    }
    rows, skipped = _index(find_shard(root, "t"))
    assert set(rows) == {"ok"}
    assert {(s.entry, s.reason) for s in skipped} == {
        ("../../x.jpg", "unsafe_member_name"), ("/../y.jpg", "unsafe_member_name"), ("z.txt", "orphan_sidecar"),
    }
    frame = skipped_frame("t", skipped)
    assert frame.columns == ["shard", "entry", "reason", "detail"] and frame.height == 3


# ------------------------------------------------------------------------ 6. display spoofing
def test_bidi_and_control_characters_in_shard_names_are_escaped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    name = "evil\u202egpj.exe"
    write_folder_shard(root / name, {"a\u2066b.jpg": JPG})
    (shard,) = discover_shards(root)[0]
    assert shard.name == "evil%E2%80%AEgpj.exe"
    rows, _ = _index(find_shard(root, shard.name))
    (image_id,) = [r["image_id"] for r in rows.values()]
    assert image_id == "evil%E2%80%AEgpj.exe/a%E2%81%A6b"
    assert not any(0x2066 <= ord(c) <= 0x2069 or 0x202A <= ord(c) <= 0x202E for c in image_id)


# ---------------------------------------------------------------------------- 7. huge captions
def test_a_huge_caption_is_cut_and_noted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shard = write_folder_shard(root / "s", {"a.jpg": JPG, "b.png": PNG}, captions={"b": "short"})
    (shard / "a.txt").write_bytes(b"word " * (10 * 2**20))  # 50 MB
    t0 = time.perf_counter()
    rows, _ = _index(find_shard(root, "s"), ReadLimits(max_caption_bytes=4096))
    assert time.perf_counter() - t0 < 20
    assert len(rows["a"]["caption"].encode()) <= 4096
    assert "caption cut to its first 4096 of 52428800 bytes" in rows["a"]["error"]
    assert rows["b"]["caption"] == "short" and rows["b"]["error"] is None
