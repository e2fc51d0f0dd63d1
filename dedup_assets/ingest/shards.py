"""Shard discovery and record reading for img2dataset-style datasets (no Dagster here).

Layout. A dataset root holds shards: folders `<root>/<shard>/` (walked recursively) or WebDataset
tars `<root>/<shard>.tar` (extension case-insensitive). Inside a shard, `<key>.<image ext>` with
optional sidecars `<key>.txt` (caption) and `<key>.json` (metadata object). Grain: one `Record`
per image file; a file with an image extension that holds no image is still a record (the decoder
gives it a reason).

Every entry is accounted for. An image file that is not read still gives a record, with a
`read_status`: `outside_root` (a link whose resolved target leaves the dataset root),
`link_not_followed` (any link, with follow_links "never"), `broken_link`, `not_a_regular_file`
(a FIFO, socket or device: checked with lstat, never opened), `too_large_file` (above
`ReadLimits.max_file_bytes`, never read), `unresolved_link` (a tar link member whose target is
not an earlier regular member), `unreadable`, `truncated`. Entries that give no record are
appended to the caller's `skipped` list (`Skipped`, with a reason): `hidden` (a path part starting
with "."), `other_extension`, `orphan_sidecar`, `duplicate_sidecar`, `unsafe_member_name` (a tar
member that climbs out with ".."), `link_loop`, `damaged_tar`; `discover_shards` does the same for
the entries directly under the root (`ROOT_SKIP_REASONS`). A sidecar that is a link out of the
root, a FIFO, too large, malformed or nested too deep only adds a note to its image's error.
Nothing outside the dataset root is ever opened: links are resolved (`realpath`) and checked for
containment before anything is read, files are opened with O_NOFOLLOW | O_NONBLOCK, and a tar's
link members resolve only to earlier members of the same archive. Following links inside the
root is the default (`ReadLimits.follow_links = "inside_root"`); "never" reads no link at all.

Shard names are Dagster partition keys: the folder name or tar stem escaped like keys (below), so
control and bidi characters and bytes that are not UTF-8 never reach a partition key, a log line
or a page raw; a name that Dagster would still refuse (see `INVALID_KEY_SUBSTRINGS`) or an empty
one is rejected with a reason instead of crashing. A folder and a tar with the same name: the tar
is rejected.

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
- folder shard → the escaped absolute path of the file (of a link's vetted target);
- tar shard → `<escaped absolute tar path>::<header offset>/<escaped member name as stored>`; the
  offset tells apart members that share a name.
In the path part, a ":" next to another ":" or at the end is also written `%3A`, so the first
"::" of a location always separates the tar from the member, and a location without "::" is a
plain file. `parse_location` / `split_location` do this split for other modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
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


def tar_location(tar_path: bytes | str | Path, member_name: str, offset: int) -> str:
    """The location of a tar member: `member_name` exactly as `TarInfo.name` gives it, `offset`
    the member's header offset (`TarInfo.offset`), which tells apart members that share a name."""
    tar = _escape_path(os.fsencode(os.path.abspath(os.fsencode(tar_path))))
    return f"{tar}{TAR_SEPARATOR}{int(offset)}/{escape(member_name.encode('utf-8', 'surrogateescape'))}"


@dataclass(frozen=True)
class Location:
    """A parsed location: a plain file (`member` None) or one member of a tar."""

    path: bytes
    member: bytes | None = None
    offset: int | None = None  # the tar member's header offset


def parse_location(location: str) -> Location:
    """Inverse of `folder_location` / `tar_location`."""
    cut = location.find(TAR_SEPARATOR)
    if cut < 0:
        return Location(unescape(location))
    rest = location[cut + len(TAR_SEPARATOR) :]
    digits, slash, member = rest.partition("/")
    if not slash or not digits.isdigit():
        raise ValueError(f"not a tar member location (expected <tar>::<offset>/<member>): {location!r}")
    return Location(unescape(location[:cut]), unescape(member), int(digits))


def split_location(location: str) -> tuple[bytes, bytes | None]:
    """(file path, None) for a folder-shard location; (tar path, member name) for a tar member."""
    loc = parse_location(location)
    return loc.path, loc.member


# -------------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class ReadLimits:
    """What the readers accept from a shard; every limit has a recorded reason when it bites.

    follow_links: "inside_root" reads a symbolic link whose target (fully resolved) lies inside
    the dataset root, as the file it points to; "never" reads no link at all. A link that leaves
    the root is never read, whatever this says.
    """

    max_file_bytes: int = 128 * 2**20  # an image file above this is `too_large_file`, never read
    max_caption_bytes: int = 64 * 2**10  # a longer caption is cut here (noted in the row's error)
    max_sidecar_bytes: int = 2**20  # a larger JSON sidecar is not parsed (noted)
    max_json_depth: int = 64  # a JSON sidecar nested deeper is not kept (noted)
    follow_links: Literal["inside_root", "never"] = "inside_root"

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_caption_bytes", "max_sidecar_bytes", "max_json_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ReadLimits.{name}={v!r}: give a positive integer")
        if self.follow_links not in ("inside_root", "never"):
            raise ValueError(
                f"ReadLimits.follow_links={self.follow_links!r}: give 'inside_root' or 'never'"
            )


@dataclass(frozen=True)
class Shard:
    """One partition of the dataset: a folder or a tar file."""

    name: str  # the partition key: the folder name or tar stem, escaped like keys
    path: Path  # absolute
    kind: Literal["folder", "tar"]
    root: Path | None = None  # the dataset root (None: the shard's parent folder)

    @property
    def dataset_root(self) -> Path:
        return self.root if self.root is not None else self.path.parent


@dataclass(frozen=True)
class RejectedShard:
    """An entry directly under the root that is not a shard (or cannot be one), and why."""

    path: Path
    reason: str  # one line: "<code>: <explanation>" (codes in `ROOT_SKIP_REASONS`)

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class Skipped:
    """An entry inside a shard that gives no index row, and why (grain: one file or tar member).

    `entry` is the escaped path relative to the shard (a tar member: its name as stored).
    """

    entry: str
    reason: str
    detail: str | None = None


@dataclass
class Record:
    """One image file of a shard with its bytes and sidecars (grain: one image file)."""

    key: str  # relative key without extension, escaped (module docstring)
    location: str  # invertible locator, see `read_location`
    data: bytes  # the file's bytes (b"" when they were not read)
    caption: str | None
    meta: dict[str, Any] | None
    sidecar_error: str | None  # e.g. a malformed JSON sidecar: recorded, never fatal
    # Set when the bytes were not or could not be read: the status for the index (a reason such
    # as "unreadable", "outside_root", "too_large_file"; module docstring) and the error text.
    read_status: str | None = None
    read_error: str | None = None


# ---------------------------------------------------------------------------------- discovery
def _name_problem(name: str) -> str | None:
    """Why an (escaped) shard name cannot be a partition key, or None."""
    if not name:
        return "invalid_name: empty shard name"
    for bad in INVALID_KEY_SUBSTRINGS:
        if bad in name:
            return (
                f"invalid_name: the shard name contains {bad!r}, which Dagster does not allow in a "
                "partition key; rename the folder or tar"
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


def _inside(real: bytes, root_real: bytes) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(b"/") + b"/")


def _classify_root_entry(full: bytes, root_real: bytes, follow: str) -> tuple[str | None, str | None]:
    """('folder' | 'file' | None, rejection reason or None) for an entry directly under the root."""
    try:
        st = os.lstat(full)
    except OSError as e:
        return None, f"unreadable: {type(e).__name__}: {e}"
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(full)
        if not _inside(real, root_real):
            return None, "outside_root: a symbolic link to a place outside the dataset root (not followed)"
        if follow == "never":
            return None, "link_not_followed: a symbolic link (follow_links is 'never')"
        try:
            st = os.stat(real)
        except OSError:
            return None, "broken_link: a symbolic link whose target does not exist"
    if stat.S_ISDIR(st.st_mode):
        return "folder", None
    if stat.S_ISREG(st.st_mode):
        return "file", None
    return None, "not_a_regular_file: a FIFO, socket or device, not a folder or a file"


ROOT_SKIP_REASONS = (
    "hidden", "not_a_shard", "invalid_name", "collision", "outside_root", "link_not_followed",
    "broken_link", "not_a_regular_file", "unreadable",
)


def discover_shards(
    root: Path, follow_links: str = "inside_root"
) -> tuple[list[Shard], list[RejectedShard]]:
    """The shards directly under `root` (sorted by name) and every other entry with a reason.

    Every entry of the root is accounted for: it is a shard, or it is in the second list
    (hidden names, files that are not `.tar`, names Dagster cannot use, collisions, links that
    leave the root, FIFOs and devices). When a folder and a tar share a name, the folder wins;
    of two tars whose extensions differ only in case, the one spelled `.tar` wins.
    """
    root = _root_dir(root)
    rootb = os.fsencode(root)
    root_real = os.path.realpath(rootb)
    shards: dict[str, Shard] = {}
    rejected: list[RejectedShard] = []
    tars: list[tuple[bytes, bytes, str]] = []
    for raw in sorted(os.listdir(rootb)):
        full = os.path.join(rootb, raw)
        path = Path(os.fsdecode(full))
        if raw.startswith(b"."):
            rejected.append(RejectedShard(path, "hidden: a name starting with '.' (hidden entries are skipped)"))
            continue
        kind, problem = _classify_root_entry(full, root_real, follow_links)
        if problem is None and kind == "file" and not raw.lower().endswith(b".tar"):
            problem = "not_a_shard: a file that is not a .tar (e.g. img2dataset's .parquet/_stats.json)"
        if problem:
            rejected.append(RejectedShard(path, problem))
        elif kind == "folder":
            name = escape(raw)
            problem = _name_problem(name)
            if problem:
                rejected.append(RejectedShard(path, problem))
            else:
                shards[name] = Shard(name, path, "folder", root)
        else:
            tars.append((raw[:-4], raw[-4:], os.fsdecode(full)))
    tar_shards: dict[str, Shard] = {}
    for stem, ext, full in sorted(tars, key=lambda t: (t[0], t[1] != b".tar", t[1])):
        name = escape(stem)
        problem = _name_problem(name)
        if problem is None and name in shards:
            problem = f"collision: the name collides with folder shard {shards[name].path}"
        if problem is None and name in tar_shards:
            problem = f"collision: the name collides with tar shard {tar_shards[name].path}"
        if problem:
            rejected.append(RejectedShard(Path(full), problem))
        else:
            tar_shards[name] = Shard(name, Path(full), "tar", root)
    shards.update(tar_shards)
    return [shards[k] for k in sorted(shards)], sorted(rejected, key=lambda r: os.fsencode(r.path))


def find_shard(root: Path, name: str, follow_links: str = "inside_root") -> Shard:
    """The shard called `name` under `root`, resolved by the same rules as `discover_shards`.

    Raises KeyError (with what was looked for) when there is none.
    """
    root = _root_dir(root)
    problem = _name_problem(name)
    raw = unescape(name)
    if problem is None and (b"/" in raw or raw.startswith(b".") or escape(raw) != name):
        problem = "a shard name cannot contain '/', start with '.', or be escaped differently"
    if problem:
        raise KeyError(f"{name!r} is not a shard name under {root}: {problem}")
    rootb = os.fsencode(root)
    root_real = os.path.realpath(rootb)
    # Fast paths first: a sensor may call this once per partition on a root with many shards.
    folder = os.path.join(rootb, raw)
    if _classify_root_entry(folder, root_real, follow_links) == ("folder", None):
        return Shard(name, Path(os.fsdecode(folder)), "folder", root)
    tar = folder + b".tar"
    if not os.path.lexists(folder) and _classify_root_entry(tar, root_real, follow_links) == ("file", None):
        return Shard(name, Path(os.fsdecode(tar)), "tar", root)
    for shard in discover_shards(root, follow_links)[0]:  # e.g. NAME.TAR
        if shard.name == name:
            return shard
    raise KeyError(f"shard {name!r} not found under {root} (expected {root / os.fsdecode(raw)}/ or .tar)")


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


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when `value` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


@dataclass
class _Side:
    """A sidecar's bytes as read (at most the limit), or why it was not read."""

    data: bytes | None
    size: int = 0  # the size on disk / in the tar
    problem: str | None = None


def _cap_caption(text: str, limits: ReadLimits, errors: list[str], size: int | None = None) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    if size is None:
        size = len(raw)
    if size <= limits.max_caption_bytes:
        return text
    errors.append(f"caption cut to its first {limits.max_caption_bytes} of {size} bytes (max_caption_bytes)")
    return raw[: limits.max_caption_bytes].decode("utf-8", "ignore")


def _sidecars(
    txt: _Side | None, js: _Side | None, limits: ReadLimits
) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(caption, metadata, error): the .txt caption wins, else the JSON "caption" field.

    Never raises: any problem with a sidecar becomes a note in the error text.
    """
    caption = meta = None
    errors: list[str] = []
    try:
        if txt is not None and txt.problem:
            errors.append(f"caption .txt not read: {txt.problem}")
        elif txt is not None and txt.data is not None:
            text = txt.data.decode("utf-8-sig", "replace")
            caption = _cap_caption(text, limits, errors, size=txt.size).strip()
        if js is not None and js.problem:
            errors.append(f"json sidecar not read: {js.problem}")
        elif js is not None and js.data is not None:
            if js.size > limits.max_sidecar_bytes:
                errors.append(f"json sidecar of {js.size} bytes not parsed (max_sidecar_bytes {limits.max_sidecar_bytes})")
            else:
                try:
                    parsed = json.loads(js.data)  # bytes: json detects UTF-8/16/32 and a BOM itself
                except (ValueError, RecursionError) as e:
                    errors.append(f"bad json sidecar: {str(e)[:200]}")
                else:
                    if not isinstance(parsed, dict):
                        errors.append(f"json sidecar is a {type(parsed).__name__}, not an object")
                    elif _json_depth_exceeds(parsed, limits.max_json_depth):
                        errors.append(f"json sidecar nests deeper than {limits.max_json_depth} levels; not kept")
                    else:
                        meta = _clean_json(parsed)
        if not caption and meta is not None and isinstance(meta.get("caption"), str):
            caption = _cap_caption(meta["caption"], limits, errors).strip()
    except Exception as e:  # noqa: BLE001 - a sidecar problem must only add a note to its row
        errors.append(f"sidecar could not be processed ({type(e).__name__}: {str(e)[:200]})")
        caption, meta = None, None
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


class FileProblem(OSError):
    """A file that is not read, with the index status (`reason`) and an explanation."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _describe_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_regular_file(path: bytes, cap: int, truncate: bool = False) -> tuple[bytes, int]:
    """(bytes, size on disk) of a regular file; never blocks, never reads more than `cap` bytes.

    The file is checked with `lstat` before it is opened (a FIFO, socket or device is never
    opened; a symbolic link is never followed here: callers resolve and vet links first), then
    opened with O_NOFOLLOW | O_NONBLOCK and checked again with `fstat` (same inode, regular).
    A file larger than `cap` raises FileProblem("too_large_file") — or, with `truncate`, gives
    its first `cap` bytes.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        raise FileProblem("unreadable", f"{type(e).__name__}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise FileProblem("unreadable", "the file became a symbolic link while it was read")
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem("not_a_regular_file", f"{_describe_mode(st.st_mode)}, not a regular file; not opened")
    if st.st_size > cap and not truncate:
        raise FileProblem("too_large_file", f"{st.st_size} bytes, above max_file_bytes ({cap}); not read")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FileProblem("unreadable", f"{type(e).__name__}: {e}") from None
    try:
        st2 = os.fstat(fd)
        if (st2.st_ino, st2.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(st2.st_mode):
            raise FileProblem("unreadable", "the file was replaced while it was read")
        chunks, got = [], 0
        while got <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    except FileProblem:
        raise
    except OSError as e:
        raise FileProblem("unreadable", f"{type(e).__name__}: {e}") from None
    finally:
        os.close(fd)
    if len(data) > cap:
        if not truncate:
            raise FileProblem("too_large_file", f"grew above max_file_bytes ({cap}) while it was read")
        data = data[:cap]
    return data, max(st.st_size, len(data))


@dataclass
class _Entry:
    """A file found in a folder shard: where to read it, or why it is not read."""

    rel: bytes  # relative to the shard
    path: bytes | None  # what to open (a vetted link's resolved target)
    problem: FileProblem | None = None


def _vet_link(full: bytes, root_real: bytes, follow: str) -> tuple[bytes | None, FileProblem | None]:
    real = os.path.realpath(full)
    if not _inside(real, root_real):
        return None, FileProblem("outside_root", "a symbolic link to a place outside the dataset root; not followed")
    if follow == "never":
        return None, FileProblem("link_not_followed", "a symbolic link (follow_links is 'never'); not followed")
    if not os.path.lexists(real) or not os.path.exists(real):
        return None, FileProblem("broken_link", "a symbolic link whose target does not exist")
    return real, None


def _walk_folder(shard: Shard, limits: ReadLimits, skipped: list[Skipped]) -> list[_Entry]:
    """Every file of a folder shard (links vetted), in a deterministic order; skips recorded."""
    root_real = os.path.realpath(os.fsencode(shard.dataset_root))
    top = os.fsencode(shard.path)
    out: list[_Entry] = []
    visited = {os.path.realpath(top)}
    stack: list[tuple[bytes, bytes]] = [(top, b"")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            # A folder that cannot be listed would silently lose its images: fail with the path.
            raise OSError(f"cannot list folder {os.fsdecode(folder)!r} of shard {shard.name}: {e}") from e
        subfolders = []
        for e in entries:
            rel = prefix + e.name
            if e.name.startswith(b"."):
                skipped.append(Skipped(escape(rel), "hidden", "a name starting with '.'"))
                continue
            target, problem = e.path, None
            try:
                is_link = e.is_symlink()
            except OSError:
                is_link = False
            if is_link:
                target, problem = _vet_link(e.path, root_real, limits.follow_links)
            if problem is None:
                try:
                    is_dir = os.path.isdir(target) if is_link else e.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    real = os.path.realpath(target)
                    if real in visited or _inside(os.path.realpath(top), real):
                        skipped.append(Skipped(escape(rel), "link_loop", "a link to a folder already walked"))
                    else:
                        visited.add(real)
                        subfolders.append((target, rel + b"/"))
                    continue
            out.append(_Entry(rel, target, problem))
        stack.extend(reversed(subfolders))
    return out


def _read_side(entry: _Entry | None, cap: int) -> _Side | None:
    if entry is None:
        return None
    if entry.problem is not None:
        return _Side(None, 0, f"{entry.problem.reason} ({entry.problem})")
    try:
        data, size = read_regular_file(entry.path, cap, truncate=True)  # type: ignore[arg-type]
    except FileProblem as e:
        return _Side(None, 0, f"{e.reason} ({e})")
    return _Side(data, size)


def _iter_folder(shard: Shard, limits: ReadLimits, skipped: list[Skipped]) -> Iterator[Record]:
    images: list[tuple[bytes, bytes, _Entry]] = []  # (base, ext, entry)
    sidecars: dict[tuple[bytes, str], _Entry] = {}
    for entry in _walk_folder(shard, limits, skipped):
        base, ext = _split_ext(entry.rel)
        kind = _kind(ext)
        if kind == "image":
            images.append((base, ext, entry))
        elif kind is not None:
            sidecars[(base, kind)] = entry
        elif entry.problem is not None:  # e.g. a link to a folder outside the root
            skipped.append(Skipped(escape(entry.rel), entry.problem.reason, str(entry.problem)))
        else:
            skipped.append(Skipped(escape(entry.rel), "other_extension", "neither an image nor a .txt/.json sidecar"))
    bases = {b for b, _, _ in images}
    for (base, kind), entry in sorted(sidecars.items()):
        if base not in bases:
            skipped.append(Skipped(escape(entry.rel), "orphan_sidecar", f"a .{kind} without an image of the same name"))
    keys = _KeyAssigner()
    images.sort(key=lambda t: (t[0], _ext_order(t[1])))
    for base, group in groupby(images, key=lambda t: t[0]):
        members = list(group)
        txt, js = sidecars.get((base, "txt")), sidecars.get((base, "json"))
        caption, meta, side_err = _sidecars(
            _read_side(txt, limits.max_caption_bytes), _read_side(js, limits.max_sidecar_bytes + 1), limits
        )
        for key, (_, _, entry) in zip(keys.group(base, [m[1] for m in members]), members):
            where = entry.path if entry.path is not None else os.path.join(os.fsencode(shard.path), entry.rel)
            location = folder_location(where)
            if entry.problem is not None:
                yield Record(key, location, b"", caption, meta, side_err, entry.problem.reason, str(entry.problem))
                continue
            try:
                data, _ = read_regular_file(entry.path, limits.max_file_bytes)  # type: ignore[arg-type]
            except FileProblem as e:  # a row with a reason, not a crash
                yield Record(key, location, b"", caption, meta, side_err, e.reason, str(e))
                continue
            yield Record(key, location, data, caption, meta, side_err)


def _member_rel(name: str) -> tuple[bytes | None, str | None]:
    """(the member's path normalised for keys, None) or (None, skip reason)."""
    parts = [p for p in name.encode("utf-8", "surrogateescape").split(b"/") if p not in (b"", b".")]
    if not parts:
        return None, "unsafe_member_name"
    if b".." in parts:
        return None, "unsafe_member_name"
    if any(p.startswith(b".") for p in parts):
        return None, "hidden"
    return b"/".join(parts), None


@dataclass
class _Member:
    name: str
    offset: int  # header offset: part of the location
    base: bytes
    ext: bytes
    kind: str
    data: bytes
    size: int = 0  # the member's size in the archive (data may be cut at a cap)
    status: str | None = None  # set when the bytes were not read
    error: str | None = None


def _tar_group(
    shard: Shard, members: list[_Member], keys: _KeyAssigner, limits: ReadLimits, skipped: list[Skipped]
) -> Iterator[Record]:
    images = sorted((m for m in members if m.kind == "image"), key=lambda m: _ext_order(m.ext))
    sides = [m for m in members if m.kind != "image"]
    if not images:
        for m in sides:
            skipped.append(Skipped(escape(m.name.encode("utf-8", "surrogateescape")), "orphan_sidecar",
                                   "a sidecar member without an image member next to it"))
        return
    chosen: dict[str, _Member] = {}
    for m in sides:
        if m.kind in chosen:
            skipped.append(Skipped(escape(m.name.encode("utf-8", "surrogateescape")), "duplicate_sidecar",
                                   "a second sidecar of the same kind for one image"))
        else:
            chosen[m.kind] = m

    def side(m: _Member | None) -> _Side | None:
        if m is None:
            return None
        if m.status is not None:
            return _Side(None, 0, f"{m.status} ({m.error})")
        return _Side(m.data, max(m.size, len(m.data)))

    caption, meta, side_err = _sidecars(side(chosen.get("txt")), side(chosen.get("json")), limits)
    for key, m in zip(keys.group(images[0].base, [m.ext for m in images]), images):
        loc = tar_location(shard.path, m.name, m.offset)
        if m.status is not None:
            yield Record(key, loc, b"", caption, meta, side_err, m.status, m.error)
        else:
            yield Record(key, loc, m.data, caption, meta, side_err)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _is_plain_tar(path: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return not any(head.startswith(m) for m in _COMPRESSED_MAGIC)


def _link_target(info: tarfile.TarInfo) -> tuple[bytes | None, str | None]:
    """(normalised name of the member a link points to, None) or (None, reason)."""
    link = info.linkname
    if info.issym():
        if link.startswith("/"):
            return None, "outside_root"
        link = posixpath.normpath(posixpath.join(posixpath.dirname(info.name), link))
    norm = posixpath.normpath(link) if link else ""
    if not norm or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        return None, "outside_root"
    rel, problem = _member_rel(norm)
    return rel, (None if rel is not None else "outside_root")


def _iter_tar(shard: Shard, limits: ReadLimits, skipped: list[Skipped]) -> Iterator[Record]:
    keys = _KeyAssigner()
    group: list[_Member] = []
    tar_b = os.fsencode(shard.path)
    root_real = os.path.realpath(os.fsencode(shard.dataset_root))
    if not _inside(os.path.realpath(tar_b), root_real):
        raise FileProblem("outside_root", f"tar shard {shard.path} resolves outside the dataset root")
    plain = _is_plain_tar(tar_b)
    # Regular members met so far (normalised name -> data offset, size): hardlinks and symlinks
    # inside the archive resolve to them (a plain tar only: its offsets are file offsets).
    seen: dict[bytes, tuple[int, int]] = {}
    raw = open(tar_b, "rb") if plain else None
    # "r|*": one sequential pass over the archive (compressed or not), nothing seeks back.
    try:
        tf = tarfile.open(shard.path, "r|*", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as e:
        if raw is not None:
            raw.close()
        raise tarfile.ReadError(f"tar shard {shard.path} is not a readable tar archive: {e}") from e
    try:
        with tf:
            while True:
                try:
                    info = tf.next()
                except tarfile.ReadError:  # damaged header after the first: the rest is unreadable
                    skipped.append(Skipped("", "damaged_tar", "a damaged member header: the rest of the archive is unreadable"))
                    break
                if info is None:
                    break
                if info.isdir():
                    continue
                ename = escape(info.name.encode("utf-8", "surrogateescape"))
                rel, why = _member_rel(info.name)
                if rel is None:
                    skipped.append(Skipped(ename, why or "unsafe_member_name",
                                           "a member name that climbs out with '..' or is empty; not read"
                                           if why == "unsafe_member_name" else "a name starting with '.'"))
                    continue
                base, ext = _split_ext(rel)
                kind = _kind(ext)
                if kind is None:
                    skipped.append(Skipped(ename, "other_extension", "neither an image nor a .txt/.json sidecar"))
                    continue
                if group and group[0].base != base:
                    yield from _tar_group(shard, group, keys, limits, skipped)
                    group = []
                cap = limits.max_file_bytes if kind == "image" else (
                    limits.max_caption_bytes if kind == "txt" else limits.max_sidecar_bytes)
                m = _Member(info.name, info.offset, base, ext, kind, b"", info.size)
                if info.isfile():
                    if info.size > cap and kind == "image":
                        m.status, m.error = "too_large_file", f"{info.size} bytes, above max_file_bytes ({cap}); not read"
                    elif info.size > cap and kind == "json":
                        m.status, m.error = "too_large_file", f"{info.size} bytes, above max_sidecar_bytes ({cap})"
                    else:
                        try:
                            f = tf.extractfile(info)
                            m.data = f.read(cap) if f is not None else b""
                        except (tarfile.ReadError, EOFError, OSError) as e:
                            # The archive ends inside this member (an interrupted download): keep the row.
                            m.status, m.error = "truncated", f"tar archive ends inside this member: {e}"
                            group.append(m)
                            break
                        seen[rel] = (info.offset_data, info.size)
                elif info.islnk() or info.issym():
                    target, why = _link_target(info)
                    if target is None:
                        m.status, m.error = why or "outside_root", "a link member that points outside the archive; not followed"
                    elif limits.follow_links == "never" and info.issym():
                        m.status, m.error = "link_not_followed", "a symbolic link member (follow_links is 'never')"
                    elif target not in seen or raw is None:
                        m.status, m.error = "unresolved_link", (
                            f"a link to member {escape(target)!r}, which is not an earlier regular member"
                            if raw is not None else "a link member inside a compressed tar (not resolved)")
                    else:
                        off, size = seen[target]
                        if size > cap and kind != "txt":
                            m.status, m.error = "too_large_file", f"{size} bytes, above the limit ({cap}); not read"
                        else:
                            raw.seek(off)
                            m.data, m.size = raw.read(min(size, cap)), size
                            seen[rel] = (off, size)
                else:
                    m.status, m.error = "not_a_regular_file", "a device, FIFO or other special member; not read"
                group.append(m)
    finally:
        if raw is not None:
            raw.close()
    if group:
        yield from _tar_group(shard, group, keys, limits, skipped)


def iter_shard(
    shard: Shard, limits: ReadLimits = ReadLimits(), skipped: list[Skipped] | None = None
) -> Iterator[Record]:
    """One Record per image file of the shard, streamed (a tar is read once, sequentially).

    Entries that give no record (hidden names, other extensions, orphan sidecars, unsafe tar
    member names, link loops) are appended to `skipped` with a reason.
    """
    sink: list[Skipped] = skipped if skipped is not None else []
    if shard.kind == "tar":
        return _iter_tar(shard, limits, sink)
    return _iter_folder(shard, limits, sink)


def shard_fingerprint(shard: Shard) -> str:
    """A digest of what a shard holds, from metadata only (no file is read): for a tar its size,
    mtime and inode; for a folder every entry's relative name, type, size, mtime and inode (a
    link: its target text and the target's size and mtime). Equal fingerprints mean the files
    did not change (a change inside a folder reached through a link is not seen: use --force).
    """
    h = hashlib.sha256()

    def add(rel: bytes, st: os.stat_result) -> None:
        h.update(b"%s\0%o %d %d %d\n" % (rel, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino))

    top = os.fsencode(shard.path)
    add(b"", os.stat(top))
    if shard.kind == "folder":
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, top)
                try:
                    st = os.lstat(full)
                    add(rel, st)
                    if stat.S_ISLNK(st.st_mode):
                        h.update(os.readlink(full) + b"\n")
                        add(rel + b"->", os.stat(full))
                except OSError:
                    h.update(rel + b"\0gone\n")
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ random access
@lru_cache(maxsize=16)
def _tar_index(path: bytes, mtime_ns: int, size: int) -> dict[int, tuple[bytes, int, int]] | None:
    """header offset → (member name, data offset, size) for a plain tar, links resolved to their
    targets' data; None when the tar needs tarfile (compressed).

    Cached per (path, mtime, size): reading many members of one tar one by one must not rescan
    the archive each time, and a rewritten tar gets a fresh index.
    """
    if not _is_plain_tar(path):
        return None
    try:
        tf = tarfile.open(os.fsdecode(path), "r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError:
        return None
    with tf:
        index: dict[int, tuple[bytes, int, int]] = {}
        regular: dict[bytes, tuple[int, int]] = {}
        for m in tf:
            name = m.name.encode("utf-8", "surrogateescape")
            if m.isfile() and not m.issparse():
                index[m.offset] = (name, m.offset_data, m.size)
                rel, _ = _member_rel(m.name)
                if rel is not None:
                    regular[rel] = (m.offset_data, m.size)
            elif m.islnk() or m.issym():
                target, _ = _link_target(m)
                if target is not None and target in regular:
                    index[m.offset] = (name, *regular[target])
        return index


def _read_member(tar_path: bytes, member: bytes, offset: int, cap: int) -> bytes:
    st = os.stat(tar_path)
    index = _tar_index(tar_path, st.st_mtime_ns, st.st_size)
    name = member.decode("utf-8", "surrogateescape")
    if index is not None:
        hit = index.get(offset)
        if hit is None or hit[0] != member:
            raise KeyError(f"no member {escape(member)!r} at offset {offset} in tar {escape(tar_path)}")
        _, data_offset, size = hit
        if size > cap:
            raise FileProblem("too_large_file", f"member of {size} bytes, above max_file_bytes ({cap})")
        with open(tar_path, "rb") as f:
            f.seek(data_offset)
            data = f.read(size)
        if len(data) != size:
            raise EOFError(f"tar {os.fsdecode(tar_path)} ends inside member {name!r}")
        return data
    with tarfile.open(os.fsdecode(tar_path), "r:*", encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            if m.offset == offset and m.name == name:
                if m.size > cap:
                    raise FileProblem("too_large_file", f"member of {m.size} bytes, above max_file_bytes ({cap})")
                f = tf.extractfile(m)  # resolves links inside the archive only
                return f.read(cap + 1)[:cap] if f is not None else b""
        raise KeyError(f"no member {escape(member)!r} at offset {offset} in tar {escape(tar_path)}")


def read_location(location: str, max_bytes: int = ReadLimits.max_file_bytes) -> bytes:
    """The bytes of the file (or tar member) that a location names (module docstring).

    The same safety as indexing: regular files only, no link followed, at most `max_bytes`.
    """
    loc = parse_location(location)
    if loc.member is None:
        return read_regular_file(loc.path, max_bytes)[0]
    return _read_member(loc.path, loc.member, int(loc.offset or 0), max_bytes)
