"""Shard discovery and record reading for img2dataset-style datasets.

A dataset root holds shards: folders `<root>/<shard>/` (walked recursively) or WebDataset tars
`<root>/<shard>.tar`. Inside, `<key>.<image ext>` with optional `<key>.txt` (caption) and
`<key>.json` (metadata). One `Record` per image file.

Names that are not valid UTF-8: keys and locations are stored as printable UTF-8 strings in
which every byte that is not part of valid UTF-8 is written `%XX` and a literal `%` is written
`%25`; nothing else is escaped, so ordinary names read as they are. `unescape` inverts this
exactly, so `read_location(location)` opens the very file (or tar member) that was indexed.

Locations: a folder shard's file → its escaped absolute path; a tar member →
`<escaped tar path>::<escaped member name>` (split at the first `.tar::`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SIDECAR_EXTENSIONS = (".txt", ".json")

# Mirrors dagster's partition-key rules (INVALID_PARTITION_SUBSTRINGS in
# dagster/_core/definitions/partitions/utils/base.py, and the multi-partition delimiters in
# .../utils/multi.py), so a shard name is always a usable partition key.
INVALID_KEY_SUBSTRINGS: tuple[str, ...] = (
    "...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0", "|", ",", "[", "]",
)

TAR_SEPARATOR = "::"


def escape(raw: bytes) -> str:
    """Printable, exactly invertible UTF-8 form of a byte name (see module docstring)."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if ch == "%":
            out.append("%25")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"%{o - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


_PCT = re.compile(r"%([0-9A-F]{2})")


def unescape(text: str) -> bytes:
    """Inverse of `escape`."""
    out = bytearray()
    pos = 0
    for m in _PCT.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    kind: Literal["folder", "tar"]


@dataclass(frozen=True)
class RejectedShard:
    path: Path
    reason: str


@dataclass
class Record:
    key: str
    location: str
    data: bytes
    caption: str | None
    meta: dict[str, Any] | None
    sidecar_error: str | None


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty shard name"
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in name):
        return "shard name is not valid UTF-8"
    for bad in INVALID_KEY_SUBSTRINGS:
        if bad in name:
            return f"shard name contains {bad!r}, which Dagster does not allow in a partition key"
    return None


def discover_shards(root: Path) -> tuple[list[Shard], list[RejectedShard]]:
    """Valid shards under root, sorted by name, and the rejected ones with a reason."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    shards: dict[str, Shard] = {}
    rejected: list[RejectedShard] = []
    entries = sorted(os.listdir(os.fsencode(root)))
    tars = []
    for raw in entries:
        name = os.fsdecode(raw)
        if name.startswith("."):
            continue
        path = root / name
        if path.is_dir():
            problem = _name_problem(name)
            if problem:
                rejected.append(RejectedShard(path, problem))
            else:
                shards[name] = Shard(name, path, "folder")
        elif name.lower().endswith(".tar") and path.is_file():
            tars.append((name[:-4], path))
    for name, path in tars:
        problem = _name_problem(name)
        if problem:
            rejected.append(RejectedShard(path, problem))
        elif name in shards:
            rejected.append(RejectedShard(path, f"name collides with folder shard {shards[name].path}"))
        else:
            shards[name] = Shard(name, path, "tar")
    return [shards[k] for k in sorted(shards)], rejected


def find_shard(root: Path, name: str) -> Shard:
    shards, _ = discover_shards(root)
    for s in shards:
        if s.name == name:
            return s
    raise KeyError(f"shard {name!r} not found under {root} (expected {root}/{name}/ or {root}/{name}.tar)")


def _split_ext(rel: bytes) -> tuple[bytes, str]:
    base, ext = os.path.splitext(rel)
    return base, ext.decode("ascii", "replace").lower()


def _read_sidecars(txt: bytes | None, js: bytes | None) -> tuple[str | None, dict | None, str | None]:
    caption = None
    meta = None
    errors = []
    if txt is not None:
        caption = txt.decode("utf-8", "replace").strip()
    if js is not None:
        try:
            parsed = json.loads(js.decode("utf-8", "replace"))
            if isinstance(parsed, dict):
                meta = parsed
            else:
                errors.append("json sidecar is not an object")
        except ValueError as e:
            errors.append(f"bad json sidecar: {e}")
    if caption is None and meta and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    return caption, meta, ("; ".join(errors) or None)


def _assign_keys(bases_exts: list[tuple[bytes, str, Any]]) -> list[tuple[str, bytes, str, Any]]:
    """(key, base, ext, handle) per image; the second image of one base keeps its extension in the key."""
    seen: set[bytes] = set()
    out = []
    for base, ext, handle in sorted(bases_exts, key=lambda t: (t[0], IMAGE_EXTENSIONS.index(t[1]) if t[1] in IMAGE_EXTENSIONS else 99, t[1])):
        key = escape(base) if base not in seen else escape(base) + ext
        seen.add(base)
        out.append((key, base, ext, handle))
    return out


def _iter_folder(shard: Shard) -> Iterator[Record]:
    root = os.fsencode(shard.path)
    images: list[tuple[bytes, str, bytes]] = []
    sidecars: dict[tuple[bytes, str], bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        for fn in sorted(filenames):
            if fn.startswith(b"."):
                continue
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root)
            base, ext = _split_ext(rel)
            if ext in IMAGE_EXTENSIONS:
                images.append((base, ext, full))
            elif ext in SIDECAR_EXTENSIONS:
                sidecars[(base, ext)] = full
    for key, base, ext, full in _assign_keys(images):
        txt = sidecars.get((base, ".txt"))
        js = sidecars.get((base, ".json"))
        caption, meta, err = _read_sidecars(
            _read(txt) if txt else None, _read(js) if js else None
        )
        with open(full, "rb") as f:
            data = f.read()
        yield Record(key, escape(full), data, caption, meta, err)


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _iter_tar(shard: Shard) -> Iterator[Record]:
    tar_loc = escape(os.fsencode(shard.path.resolve()))
    with tarfile.open(shard.path, "r:") as tf:
        # Headers first (cheap seeks), so sidecars are found wherever they lie in the archive.
        members = [m for m in tf.getmembers() if m.isfile()]
        images = []
        sidecars: dict[tuple[bytes, str], tarfile.TarInfo] = {}
        for m in members:
            raw = m.name.encode("utf-8", "surrogateescape")
            if any(part.startswith(b".") for part in raw.split(b"/")):
                continue
            base, ext = _split_ext(raw)
            if ext in IMAGE_EXTENSIONS:
                images.append((base, ext, m))
            elif ext in SIDECAR_EXTENSIONS:
                sidecars[(base, ext)] = m
        for key, base, ext, m in sorted(_assign_keys(images), key=lambda t: t[3].offset):
            txt = sidecars.get((base, ".txt"))
            js = sidecars.get((base, ".json"))
            caption, meta, err = _read_sidecars(
                _member_bytes(tf, txt) if txt else None, _member_bytes(tf, js) if js else None
            )
            raw = m.name.encode("utf-8", "surrogateescape")
            yield Record(key, f"{tar_loc}{TAR_SEPARATOR}{escape(raw)}", _member_bytes(tf, m), caption, meta, err)


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(m)
    return f.read() if f is not None else b""


def iter_shard(shard: Shard) -> Iterator[Record]:
    """One Record per image file of the shard, streamed (a tar is read once, in archive order)."""
    return _iter_tar(shard) if shard.kind == "tar" else _iter_folder(shard)


def read_location(location: str) -> bytes:
    """The bytes of the file (or tar member) a location names."""
    sep = location.find(".tar" + TAR_SEPARATOR)
    if sep >= 0:
        tar_path = unescape(location[: sep + 4])
        member = unescape(location[sep + 4 + len(TAR_SEPARATOR) :]).decode("utf-8", "surrogateescape")
        with tarfile.open(os.fsdecode(tar_path), "r:") as tf:
            return _member_bytes(tf, tf.getmember(member))
    with open(unescape(location), "rb") as f:
        return f.read()
