"""Shard discovery, folder and tar readers, keys, escaping and locations, on files made here."""

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dedup_assets.ingest.shards import (
    INVALID_KEY_SUBSTRINGS,
    Location,
    Record,
    Shard,
    discover_shards,
    escape,
    find_shard,
    folder_location,
    iter_shard,
    parse_location,
    read_location,
    split_location,
    tar_location,
    unescape,
)
from dedup_assets.synth.hostile import hostile_files, write_folder_shard

H = hostile_files()
JPG, WEBP, PNG = H["cmyk.jpg"], H["image.webp"], H["gray16.png"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these member names, in this order (names may hold surrogate escapes)."""
    with tarfile.open(path, "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _by_key(shard: Shard) -> dict[str, Record]:
    recs = list(iter_shard(shard))
    assert len({r.key for r in recs}) == len(recs)  # keys are unique within a shard
    return {r.key: r for r in recs}


# -------------------------------------------------------------------------------------- escaping
def test_escape_is_printable_utf8_and_exactly_invertible() -> None:
    assert escape(b"plain/sub dir/caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x98\x80") == "plain/sub dir/café 日 😀"
    assert escape(b"100%") == "100%25"
    assert escape(b"bad\xff\xfe") == "bad%FF%FE"
    assert escape(b"new\nline\x1b[31m") == "new%0Aline%1B[31m"
    assert escape("bidi\u202eevil".encode()) == "bidi%E2%80%AEevil"
    rng = np.random.default_rng(0)
    samples = [bytes(range(256)), b"%FF literal", b"\xed\xa0\x80", "\u0085".encode()]
    samples += [rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8).tobytes() for _ in range(300)]
    for raw in samples:
        text = escape(raw)
        text.encode("utf-8")  # no lone surrogates: storable as VARCHAR
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
        assert unescape(text) == raw


def test_locations_split_at_the_first_separator_even_with_colons_in_paths() -> None:
    loc = folder_location(b"/data/odd::name:/k:.jpg")
    assert "::" not in loc and split_location(loc) == (b"/data/odd::name:/k:.jpg", None)
    loc = tar_location(b"/data/t::u:.tar", "m::n.jpg", 512)
    assert loc == "/data/t%3A%3Au:.tar::512/m::n.jpg"
    assert split_location(loc) == (b"/data/t::u:.tar", b"m::n.jpg")
    assert parse_location(loc) == Location(b"/data/t::u:.tar", b"m::n.jpg", 512)
    assert parse_location(tar_location(b"/t.tar", "0001/x.jpg", 0)).member == b"0001/x.jpg"
    assert folder_location(b"/data/a:b/c.jpg") == "/data/a:b/c.jpg"  # single colons stay readable


# ------------------------------------------------------------------------------------- discovery
def test_invalid_key_substrings_mirror_dagster() -> None:
    from dagster._core.definitions.partitions.utils.base import INVALID_PARTITION_SUBSTRINGS
    from dagster._core.definitions.partitions.utils.multi import INVALID_STATIC_PARTITIONS_KEY_CHARACTERS

    assert set(INVALID_KEY_SUBSTRINGS) == set(INVALID_PARTITION_SUBSTRINGS) | INVALID_STATIC_PARTITIONS_KEY_CHARACTERS


def test_discovery_accepts_odd_names_and_rejects_invalid_ones(tmp_path: Path) -> None:
    for name in ["00000", "it's shard (1)", "x.tar", "sp ace", "a,b", "x...y", "p|q", "[1]", "tab\tname", ".hidden"]:
        (tmp_path / name).mkdir()
    os.mkdir(os.fsencode(tmp_path) + b"/latin\xe9")  # not valid UTF-8
    _tar(tmp_path / "t1.tar", [("a.jpg", JPG)])
    _tar(tmp_path / "00000.tar", [("a.jpg", JPG)])  # collides with the folder
    _tar(tmp_path / "T.tar", [("a.jpg", JPG)])
    _tar(tmp_path / "T.TAR", [("a.jpg", WEBP)])  # collides with T.tar
    _tar(tmp_path / "c,d.tar", [("a.jpg", JPG)])
    (tmp_path / "00000.parquet").write_bytes(b"img2dataset writes these")
    (tmp_path / ".hidden.tar").write_bytes(b"")
    shards, rejected = discover_shards(tmp_path)
    # Control characters and bytes that are not UTF-8 are escaped like keys, not rejected.
    assert [(s.name, s.kind) for s in shards] == [
        ("00000", "folder"), ("T", "tar"), ("it's shard (1)", "folder"), ("latin%E9", "folder"),
        ("sp ace", "folder"), ("t1", "tar"), ("tab%09name", "folder"), ("x.tar", "folder"),
    ]
    assert all(s.path.is_absolute() for s in shards)
    assert next(s for s in shards if s.name == "T").path.name == "T.tar"
    reasons = {os.fsencode(r.path.name): r.reason for r in rejected}
    assert set(reasons) == {
        b"a,b", b"x...y", b"p|q", b"[1]", b"00000.tar", b"T.TAR", b"c,d.tar",
        b".hidden", b".hidden.tar", b"00000.parquet",  # every entry is accounted for
    }
    assert reasons[b".hidden"].startswith("hidden:") and reasons[b"00000.parquet"].startswith("not_a_shard:")
    assert "collides with folder shard" in reasons[b"00000.tar"]
    assert "collides with tar shard" in reasons[b"T.TAR"]
    assert "','" in reasons[b"a,b"] and "'...'" in reasons[b"x...y"]
    assert find_shard(tmp_path, "latin%E9").path == Path(os.fsdecode(os.fsencode(tmp_path) + b"/latin\xe9"))


def test_find_shard_follows_the_same_rules(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    _tar(tmp_path / "f.tar", [("a.jpg", JPG)])
    _tar(tmp_path / "UP.TAR", [("a.jpg", JPG)])
    assert find_shard(tmp_path, "f").kind == "folder"
    assert find_shard(tmp_path, "UP") == Shard("UP", (tmp_path / "UP.TAR").absolute(), "tar", tmp_path.absolute())
    for bad in ["nope", "a,b", "../f", ".hidden"]:
        with pytest.raises(KeyError):
            find_shard(tmp_path, bad)
    with pytest.raises(KeyError, match="not found"):
        find_shard(tmp_path, "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_shards(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        discover_shards(tmp_path / "f.tar")


# --------------------------------------------------------------------------------- folder shards
def _messy_files() -> dict[str, bytes]:
    return {
        "000.jpg": JPG,
        "UP.JPG": JPG,  # extension case does not matter
        "sub/deeper/nested.webp": WEBP,
        "dup.jpg": JPG,
        "dup.png": PNG,  # same base: keeps its extension in the key
        "dup.png.gif": H["animated.gif"],  # ... and that key is taken by this file's base
        "fake.jpg": b"not an image",  # an image extension: still a record
        "foo.bin": b"\x00\x01",  # no image extension: ignored
        "lonely.txt": b"a caption without an image",  # ignored
        ".hidden.jpg": JPG,
        ".cache/x.jpg": JPG,
        "sub/.hidden/y.jpg": JPG,
    }


SIDECARS = {
    "000.txt": "\ufeff  caption from txt \n".encode(),  # BOM and whitespace stripped
    "000.json": b'{"url": "https://example.org/0.jpg", "caption": "json loses to txt", "w": 1}',
    "UP.json": b'{"caption": "from json", "url": 7}',
    "sub/deeper/nested.txt": "nested caption \u00e9".encode(),
    "dup.json": b"{not json",
    "fake.json": b"[1, 2]",  # not an object
}


def test_folder_shard_keys_sidecars_and_skips(tmp_path: Path) -> None:
    shard_dir = write_folder_shard(tmp_path / "s", _messy_files())
    for name, data in SIDECARS.items():
        (shard_dir / name).write_bytes(data)
    recs = _by_key(find_shard(tmp_path, "s"))
    assert sorted(recs) == ["000", "UP", "dup", "dup.png", "dup.png.gif", "fake", "sub/deeper/nested"]
    assert recs["000"].caption == "caption from txt"
    assert recs["000"].meta == {"url": "https://example.org/0.jpg", "caption": "json loses to txt", "w": 1}
    assert recs["UP"].caption == "from json" and recs["UP"].meta["url"] == 7
    assert recs["sub/deeper/nested"].caption == "nested caption é"
    assert recs["dup"].data == JPG and recs["dup.png"].data == PNG and recs["dup.png.gif"].data == H["animated.gif"]
    assert "bad json sidecar" in recs["dup"].sidecar_error
    assert recs["dup.png"].sidecar_error == recs["dup"].sidecar_error  # sidecars belong to the base
    assert "not an object" in recs["fake"].sidecar_error and recs["fake"].meta is None
    assert recs["000"].sidecar_error is None and recs["000"].read_status is None
    for rec in recs.values():  # every location maps back to the very bytes
        assert read_location(rec.location) == rec.data
        assert Path(os.fsdecode(split_location(rec.location)[0])).is_absolute()


def test_an_unreadable_file_is_a_record_with_a_reason(tmp_path: Path) -> None:
    shard_dir = write_folder_shard(tmp_path / "s", {"ok.jpg": JPG})
    os.symlink(tmp_path / "nowhere.jpg", shard_dir / "gone.jpg")  # listed, but cannot be opened
    recs = _by_key(find_shard(tmp_path, "s"))
    assert recs["ok"].read_status is None
    assert recs["gone"].read_status == "broken_link" and "does not exist" in recs["gone"].read_error
    assert recs["gone"].data == b""


# ------------------------------------------------------------------------------------ tar shards
def test_tar_shard_gives_the_same_records_as_the_folder(tmp_path: Path) -> None:
    files = _messy_files()
    members = sorted(list(files.items()) + list(SIDECARS.items()))
    write_folder_shard(tmp_path / "f", dict(members))
    _tar(tmp_path / "t.tar", members)
    folder, tar = _by_key(find_shard(tmp_path, "f")), _by_key(find_shard(tmp_path, "t"))
    assert sorted(folder) == sorted(tar)
    for key, rec in folder.items():
        other = tar[key]
        fields = ("data", "caption", "meta", "sidecar_error", "read_status")
        assert [getattr(other, n) for n in fields] == [getattr(rec, n) for n in fields]
        assert read_location(other.location) == other.data
        assert other.location.startswith(str((tmp_path / "t.tar").absolute()) + "::")


def test_tar_member_paths_are_normalised_and_sidecars_may_come_first(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "t.tar", [
        ("./a.json", b'{"caption": "meta first"}'),
        ("./a.jpg", JPG),
        ("./a.txt", b"text caption"),
        ("/abs/b.png", PNG),
        ("sub/c.webp", WEBP),
        ("../evil.jpg", JPG),  # climbs out: skipped
        ("sub/.git/d.jpg", JPG),  # hidden: skipped
        ("e.jpg", JPG),
        ("f.txt", b"orphan"),
        ("a.txt", b"not next to its image: ignored"),
    ])
    recs = _by_key(Shard("t", tar, "tar"))
    assert sorted(recs) == ["a", "abs/b", "e", "sub/c"]
    assert recs["a"].caption == "text caption" and recs["a"].meta == {"caption": "meta first"}
    assert recs["e"].caption is None
    assert recs["a"].location.endswith("/./a.jpg") and read_location(recs["a"].location) == JPG


def test_a_truncated_tar_keeps_the_complete_members_and_flags_the_cut_one(tmp_path: Path) -> None:
    big = bytes(range(256)) * 40  # 10 kB
    full = _tar(tmp_path / "full.tar", [("a.jpg", JPG), ("a.txt", b"cap a"), ("b.jpg", big), ("c.jpg", JPG)])
    data = full.read_bytes()
    cut_at = data.index(big[:512]) + 5000  # inside b.jpg's data
    (tmp_path / "cut.tar").write_bytes(data[:cut_at])
    recs = list(iter_shard(Shard("cut", tmp_path / "cut.tar", "tar")))
    assert [r.key for r in recs] == ["a", "b"]
    assert recs[0].data == JPG and recs[0].caption == "cap a" and recs[0].read_status is None
    assert recs[1].read_status == "truncated" and "ends inside" in recs[1].read_error


def test_a_gzipped_tar_is_read_as_well(tmp_path: Path) -> None:
    plain = _tar(tmp_path / "plain.tar", [("a.jpg", JPG), ("a.txt", b"cap")])
    (tmp_path / "z.tar").write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    (rec,) = list(iter_shard(find_shard(tmp_path, "z")))
    assert rec.caption == "cap" and read_location(rec.location) == JPG


def test_read_location_sees_a_rewritten_tar_and_names_missing_members(tmp_path: Path) -> None:
    path = _tar(tmp_path / "t.tar", [("a.jpg", JPG)])
    loc = tar_location(path, "a.jpg", 0)
    assert read_location(loc) == JPG
    _tar(path, [("x.jpg", b"x"), ("a.jpg", WEBP)])  # same path, new content and offsets
    with pytest.raises(KeyError, match="no member"):  # a location names one member: re-index
        read_location(loc)
    (rec,) = [r for r in iter_shard(Shard("t", path, "tar")) if r.key == "a"]
    assert read_location(rec.location) == WEBP
    with pytest.raises(KeyError, match="no member"):
        read_location(tar_location(path, "missing.jpg", 0))


# ------------------------------------------------------------------------------ non-UTF-8 names
def test_non_utf8_and_odd_names_survive_and_map_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = root / "odd::name:"  # colons are valid in a partition key
    folder.mkdir(parents=True)
    fb = os.fsencode(folder)
    for name, data in [(b"caf\xe9\xff.jpg", JPG), (b"caf\xe9\xff.txt", b"latin-1 named"), (b"50%.jpg", WEBP)]:
        with open(fb + b"/" + name, "wb") as fh:
            fh.write(data)
    _tar(root / "t.tar", [
        (b"odd\xfe%name.jpg".decode("utf-8", "surrogateescape"), WEBP),
        (b"odd\xfe%name.txt".decode("utf-8", "surrogateescape"), b"tar caption"),
        ("line\nbreak.jpg", JPG),
    ])
    f, t = _by_key(find_shard(root, "odd::name:")), _by_key(find_shard(root, "t"))
    assert sorted(f) == ["50%25", "caf%E9%FF"] and sorted(t) == ["line%0Abreak", "odd%FE%25name"]
    assert f["caf%E9%FF"].caption == "latin-1 named" and t["odd%FE%25name"].caption == "tar caption"
    assert unescape(f["caf%E9%FF"].key) == b"caf\xe9\xff"
    for rec in [*f.values(), *t.values()]:
        assert rec.location.encode("utf-8") and read_location(rec.location) == rec.data
    assert read_location(f["caf%E9%FF"].location) == JPG and read_location(t["odd%FE%25name"].location) == WEBP
