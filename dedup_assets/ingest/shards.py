"""Shard discovery and record reading for img2dataset-style datasets (no Dagster here).

Layout. A dataset root holds shards: folders `<root>/<shard>/` (walked recursively) or WebDataset
tars `<root>/<shard>.tar` (extension case-insensitive). Inside a shard, `<key>.<image ext>` with
optional sidecars `<key>.txt` (caption) and `<key>.json` (metadata object). Grain: one `Record`
per image file; a sidecar without an image and files with other extensions are ignored; a file
with an image extension that holds no image is still a record (the decoder gives it a reason).
Hidden files and folders (a path part starting with ".") are skipped, in tars too; a tar member
path is normalised first (a leading "./" or "/" is dropped), and members whose path climbs out
with ".." are skipped.

Shard names are Dagster partition keys, so a name that Dagster would refuse (see
`INVALID_KEY_SUBSTRINGS`), an empty name or one that is not valid UTF-8 is rejected with a reason
instead of crashing. A folder and a tar with the same name: the tar is rejected.

Keys. `key` = the image's path relative to the shard without its extension ("sub/000123").
Two images with the same base in one shard (`a.jpg` and `a.png`): the first in the order of
`IMAGE_EXTENSIONS` keeps the bare base ("a"), the others keep their own extension as written
("a.png"); in the unlikely case that this is taken too (a file `a.png.jpg`), "~2", "~3", ... is
appended. Folders are read in sorted order; a tar is read in archive order and its members are
grouped WebDataset-style (consecutive members with one base form one sample, so sidecars must lie
next to their image, before or after it; a sidecar that does not is ignored). `image_id` =
f"{shard.name}/{key}".

Escaping (for keys and locations). File names are bytes and need not be UTF-8, but keys and
locations must be printable UTF-8 (DuckDB VARCHAR cannot hold lone surrogates, logs must not
carry control characters) and must map back to the very file. So every byte that is not part of
valid UTF-8, every byte of a control character (C0, DEL, C1, U+2028/2029, the bidi overrides
U+202A..202E and U+2066..2069) and every literal "%" is written as `%XX` (upper-case hex);
nothing else is touched, so ordinary names (accents, CJK, emoji, spaces) read as they are. `unescape`
inverts this exactly: `unescape(escape(b)) == b` for every byte string.

Locations (what `read_location` opens):
- folder shard → the escaped absolute path of the file;
- tar shard → `<escaped absolute tar path>::<escaped member name as stored in the tar>`.
In the path part, a ":" next to another ":" or at the end is also written `%3A`, so the first
"::" of a location always separates the tar from the member, and a location without "::" is a
plain file. `split_location` does this split for other modules.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Any, Iterator, Literal

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SIDECAR_EXTENSIONS = (".txt", ".json")

# Mirror of Dagster's partition-key rules, so any accepted shard name is a usable partition key:
# INVALID_PARTITION_SUBSTRINGS in dagster/_core/definitions/partitions/utils/base.py, plus
# INVALID_STATIC_PARTITIONS_KEY_CHARACTERS ("|", ",", "[", "]": the multi-partition key
# delimiters) in dagster/_core/definitions/partitions/utils/multi.py.
INVALID_KEY_SUBSTRINGS: tuple[str, ...] = (
    "...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0",
    "|", ",", "[", "]",
)

TAR_SEPARATOR = "::"

_IMAGE_RANK = {ext.encode(): i for i, ext in enumerate(IMAGE_EXTENSIONS)}
_SIDECARS = {ext.encode() for ext in SIDECAR_EXTENSIONS}


# ------------------------------------------------------------------------------------ escaping
# Characters that get %XX: literal "%", C0 controls, DEL, C1 controls, the line/paragraph
# separators and bidi overrides (they garble or spoof log lines), and the lone surrogates
# U+DC80..U+DCFF that surrogateescape decoding makes of the bytes that are not valid UTF-8.
# A fixed set, not str.isprintable(): keys must not change with the Python's Unicode version.
_NEEDS_ESCAPE = re.compile(r"[%\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\udc80-\udcff]")
_ESCAPED = re.compile(r"%([0-9A-F]{2})")
_AMBIGUOUS_COLON = re.compile(r"(?<=:):|:(?=:)|:$")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:
        return f"%{o - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def escape(raw: bytes) -> str:
    """Printable UTF-8 text for a byte name, exactly invertible by `unescape` (module docstring)."""
    return _NEEDS_ESCAPE.sub(_escape_char, raw.decode("utf-8", "surrogateescape"))


def unescape(text: str) -> bytes:
    """The byte name that `escape` (or a location's path part) was made from."""
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def _escape_path(raw: bytes) -> str:
    return _AMBIGUOUS_COLON.sub("%3A", escape(raw))


def folder_location(path: bytes | str | Path) -> str:
    """The location of a file in a folder shard (absolute path, escaped)."""
    return _escape_path(os.fsencode(os.path.abspath(os.fsencode(path))))


def tar_location(tar_path: bytes | str | Path, member_name: str) -> str:
    """The location of a tar member; `member_name` exactly as `TarInfo.name` gives it."""
    tar = _escape_path(os.fsencode(os.path.abspath(os.fsencode(tar_path))))
    return f"{tar}{TAR_SEPARATOR}{escape(member_name.encode('utf-8', 'surrogateescape'))}"


def split_location(location: str) -> tuple[bytes, bytes | None]:
    """(file path, None) for a folder-shard location; (tar path, member name) for a tar member."""
    cut = location.find(TAR_SEPARATOR)
    if cut < 0:
        return unescape(location), None
    return unescape(location[:cut]), unescape(location[cut + len(TAR_SEPARATOR) :])


# -------------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Shard:
    """One partition of the dataset: a folder or a tar file."""

    name: str  # the partition key: folder name or tar stem
    path: Path  # absolute
    kind: Literal["folder", "tar"]


@dataclass(frozen=True)
class RejectedShard:
    """A folder or tar under the root that cannot be a shard, and why."""

    path: Path
    reason: str


@dataclass
class Record:
    """One image file of a shard with its bytes and sidecars (grain: one image file)."""

    key: str  # relative key without extension, escaped (module docstring)
    location: str  # invertible locator, see `read_location`
    data: bytes  # the file's bytes (b"" for an empty or unreadable file)
    caption: str | None
    meta: dict[str, Any] | None
    sidecar_error: str | None  # e.g. a malformed JSON sidecar: recorded, never fatal
    # Set when the bytes could not be read at all: the status for the index ("unreadable", or
    # "truncated" for a tar that ends inside this member) and the error text.
    read_status: str | None = None
    read_error: str | None = None


# ---------------------------------------------------------------------------------- discovery
def _name_problem(name: str) -> str | None:
    if not name:
        return "empty shard name"
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in name):
        return (
            f"shard name {escape(os.fsencode(name))!r} is not valid UTF-8 (a partition key must "
            "be text); rename the folder or tar"
        )
    for bad in INVALID_KEY_SUBSTRINGS:
        if bad in name:
            return (
                f"shard name contains {bad!r}, which Dagster does not allow in a partition key; "
                "rename the folder or tar"
            )
    return None


def _root_dir(root: Path | str) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(
            f"dataset root {root} does not exist; pass the folder that holds the shard folders "
            "and/or <shard>.tar files"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} is not a folder")
    return root.absolute()


def discover_shards(root: Path) -> tuple[list[Shard], list[RejectedShard]]:
    """The shards directly under `root` (sorted by name) and the rejected ones with a reason.

    Hidden entries and files that are neither folders nor `.tar` files are ignored. When a folder
    and a tar share a name, the folder wins; of two tars whose extensions differ only in case,
    the one spelled `.tar` wins.
    """
    root = _root_dir(root)
    rootb = os.fsencode(root)
    shards: dict[str, Shard] = {}
    rejected: list[RejectedShard] = []
    tars: list[tuple[bytes, bytes, str]] = []
    for raw in sorted(os.listdir(rootb)):
        if raw.startswith(b"."):
            continue
        full = os.path.join(rootb, raw)
        if os.path.isdir(full):
            name = os.fsdecode(raw)
            problem = _name_problem(name)
            if problem:
                rejected.append(RejectedShard(Path(os.fsdecode(full)), problem))
            else:
                shards[name] = Shard(name, Path(os.fsdecode(full)), "folder")
        elif raw.lower().endswith(b".tar") and os.path.isfile(full):
            tars.append((raw[:-4], raw[-4:], os.fsdecode(full)))
    tar_shards: dict[str, Shard] = {}
    for stem, ext, full in sorted(tars, key=lambda t: (t[0], t[1] != b".tar", t[1])):
        name = os.fsdecode(stem)
        problem = _name_problem(name)
        if problem is None and name in shards:
            problem = f"name collides with folder shard {shards[name].path}"
        if problem is None and name in tar_shards:
            problem = f"name collides with tar shard {tar_shards[name].path}"
        if problem:
            rejected.append(RejectedShard(Path(full), problem))
        else:
            tar_shards[name] = Shard(name, Path(full), "tar")
    shards.update(tar_shards)
    return [shards[k] for k in sorted(shards)], sorted(rejected, key=lambda r: os.fsencode(r.path))


def find_shard(root: Path, name: str) -> Shard:
    """The shard called `name` under `root`, resolved by the same rules as `discover_shards`.

    Raises KeyError (with what was looked for) when there is none.
    """
    root = _root_dir(root)
    problem = _name_problem(name)
    if problem is None and ("/" in name or name.startswith(".")):
        problem = "a shard name cannot contain '/' or start with '.'"
    if problem:
        raise KeyError(f"{name!r} is not a shard name under {root}: {problem}")
    # Fast paths first: a sensor may call this once per partition on a root with many shards.
    folder = root / name
    if folder.is_dir():
        return Shard(name, folder, "folder")
    tar = root / f"{name}.tar"
    if tar.is_file():
        return Shard(name, tar, "tar")
    for shard in discover_shards(root)[0]:  # e.g. NAME.TAR
        if shard.name == name:
            return shard
    raise KeyError(f"shard {name!r} not found under {root} (expected {root / name}/ or {root / name}.tar)")


# ----------------------------------------------------------------------------------- records
def _split_ext(rel: bytes) -> tuple[bytes, bytes]:
    base, ext = os.path.splitext(rel)
    return base, ext


def _kind(ext: bytes) -> str | None:
    low = ext.lower()
    if low in _IMAGE_RANK:
        return "image"
    if low in _SIDECARS:
        return low[1:].decode()
    return None


def _clean_text(s: str) -> str:
    """The string with lone surrogates (possible from JSON "\\udXXX" escapes) made U+FFFD."""
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _sidecars(txt: bytes | None, js: bytes | None) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(caption, metadata, error): the .txt caption wins, else the JSON "caption" field."""
    caption = meta = None
    errors = []
    if txt is not None:
        caption = txt.decode("utf-8-sig", "replace").strip()
    if js is not None:
        try:
            parsed = json.loads(js)  # bytes: json detects UTF-8/16/32 and a BOM itself
        except (ValueError, RecursionError) as e:
            errors.append(f"bad json sidecar: {e}")
        else:
            if isinstance(parsed, dict):
                meta = _clean_json(parsed)
            else:
                errors.append(f"json sidecar is a {type(parsed).__name__}, not an object")
    if not caption and meta is not None and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    return caption, meta, ("; ".join(errors) or None)


class _KeyAssigner:
    """Unique keys within one shard, in the order the images are met (module docstring)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def group(self, base: bytes, exts: list[bytes]) -> list[str]:
        """Keys for the images of one base, `exts` already ordered by `_ext_order`."""
        keys = []
        for i, ext in enumerate(exts):
            key = escape(base) if i == 0 else escape(base + ext)
            if key in self.used:
                key = escape(base + ext)
            n = 2
            stem = key
            while key in self.used:
                key = f"{stem}~{n}"
                n += 1
            self.used.add(key)
            keys.append(key)
        return keys


def _ext_order(ext: bytes) -> tuple[int, bytes]:
    return _IMAGE_RANK.get(ext.lower(), len(_IMAGE_RANK)), ext


def _read_file(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _walk_error(err: OSError) -> None:
    # A folder that cannot be listed would silently lose its images: fail with the path instead.
    raise err


def _iter_folder(shard: Shard) -> Iterator[Record]:
    root = os.fsencode(shard.path)
    images: list[tuple[bytes, bytes, bytes]] = []  # (base, ext, full path)
    sidecars: dict[tuple[bytes, str], bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        for fn in filenames:
            if fn.startswith(b"."):
                continue
            full = os.path.join(dirpath, fn)
            base, ext = _split_ext(os.path.relpath(full, root))
            kind = _kind(ext)
            if kind == "image":
                images.append((base, ext, full))
            elif kind is not None:
                sidecars.setdefault((base, kind), full)
    keys = _KeyAssigner()
    images.sort(key=lambda t: (t[0], _ext_order(t[1])))
    for base, group in groupby(images, key=lambda t: t[0]):
        members = list(group)
        caption = meta = side_err = None
        txt, js = sidecars.get((base, "txt")), sidecars.get((base, "json"))
        if txt is not None or js is not None:
            try:
                caption, meta, side_err = _sidecars(
                    _read_file(txt) if txt else None, _read_file(js) if js else None
                )
            except OSError as e:
                side_err = f"cannot read sidecar: {e}"
        for key, (_, _, full) in zip(keys.group(base, [m[1] for m in members]), members):
            location = folder_location(full)
            try:
                data = _read_file(full)
            except OSError as e:  # vanished or unreadable: a row with a reason, not a crash
                yield Record(key, location, b"", caption, meta, side_err, "unreadable", f"{type(e).__name__}: {e}")
                continue
            yield Record(key, location, data, caption, meta, side_err)


def _member_rel(name: str) -> bytes | None:
    """The member's path normalised for keys; None for hidden or escaping (`..`) members."""
    parts = [p for p in name.encode("utf-8", "surrogateescape").split(b"/") if p not in (b"", b".")]
    if not parts or any(p.startswith(b".") for p in parts):
        return None
    return b"/".join(parts)


@dataclass
class _Member:
    name: str
    base: bytes
    ext: bytes
    kind: str
    data: bytes
    error: str | None = None


def _tar_group(tar_path: Path, members: list[_Member], keys: _KeyAssigner) -> Iterator[Record]:
    images = sorted((m for m in members if m.kind == "image"), key=lambda m: _ext_order(m.ext))
    if not images:
        return  # sidecars without an image
    txt = next((m for m in members if m.kind == "txt" and m.error is None), None)
    js = next((m for m in members if m.kind == "json" and m.error is None), None)
    caption, meta, side_err = _sidecars(txt.data if txt else None, js.data if js else None)
    for key, m in zip(keys.group(images[0].base, [m.ext for m in images]), images):
        loc = tar_location(tar_path, m.name)
        if m.error is not None:
            yield Record(key, loc, b"", caption, meta, side_err, "truncated", m.error)
        else:
            yield Record(key, loc, m.data, caption, meta, side_err)


def _iter_tar(shard: Shard) -> Iterator[Record]:
    keys = _KeyAssigner()
    group: list[_Member] = []
    # "r|*": one sequential pass over the archive (compressed or not), nothing seeks back.
    try:
        tf = tarfile.open(shard.path, "r|*", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as e:
        raise tarfile.ReadError(f"tar shard {shard.path} is not a readable tar archive: {e}") from e
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.ReadError:  # damaged header after the first: the rest is unreadable
                break
            if info is None:
                break
            if not info.isfile():
                continue
            rel = _member_rel(info.name)
            if rel is None:
                continue
            base, ext = _split_ext(rel)
            kind = _kind(ext)
            if kind is None:
                continue
            if group and group[0].base != base:
                yield from _tar_group(shard.path, group, keys)
                group = []
            try:
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
            except (tarfile.ReadError, EOFError, OSError) as e:
                # The archive ends inside this member (an interrupted download): keep the row.
                group.append(_Member(info.name, base, ext, kind, b"", f"tar archive ends inside this member: {e}"))
                break
            group.append(_Member(info.name, base, ext, kind, data))
    if group:
        yield from _tar_group(shard.path, group, keys)


def iter_shard(shard: Shard) -> Iterator[Record]:
    """One Record per image file of the shard, streamed (a tar is read once, sequentially)."""
    return _iter_tar(shard) if shard.kind == "tar" else _iter_folder(shard)


# ------------------------------------------------------------------------------ random access
@lru_cache(maxsize=16)
def _tar_index(path: bytes, mtime_ns: int, size: int) -> dict[bytes, tuple[int, int]] | None:
    """member name → (data offset, size) for a plain tar; None when it needs tarfile (compressed).

    Cached per (path, mtime, size): reading many members of one tar one by one must not rescan
    the archive each time, and a rewritten tar gets a fresh index.
    """
    try:
        tf = tarfile.open(os.fsdecode(path), "r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError:
        return None
    with tf:
        index: dict[bytes, tuple[int, int]] = {}
        for m in tf:
            if m.isfile() and not m.issparse():
                # A later member of the same name replaces an earlier one, as extraction would.
                index[m.name.encode("utf-8", "surrogateescape")] = (m.offset_data, m.size)
        return index


def _read_member(tar_path: bytes, member: bytes) -> bytes:
    st = os.stat(tar_path)
    index = _tar_index(tar_path, st.st_mtime_ns, st.st_size)
    name = member.decode("utf-8", "surrogateescape")
    if index is not None and member in index:
        offset, size = index[member]
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise EOFError(f"tar {os.fsdecode(tar_path)} ends inside member {name!r}")
        return data
    with tarfile.open(os.fsdecode(tar_path), "r:*", encoding="utf-8", errors="surrogateescape") as tf:
        try:
            f = tf.extractfile(tf.getmember(name))
        except KeyError:
            raise KeyError(f"no member {escape(member)!r} in tar {escape(tar_path)}") from None
        return f.read() if f is not None else b""


def read_location(location: str) -> bytes:
    """The bytes of the file (or tar member) that a location names (module docstring)."""
    path, member = split_location(location)
    if member is None:
        return _read_file(path)
    return _read_member(path, member)
