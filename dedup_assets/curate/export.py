"""Export of the kept set for training as new img2dataset-style shards (the Parquet manifest of
`filtered_dataset` is written by the table layer, `tables.build_filtered_dataset`).

Grain: an exported shard folder holds one image file (plus `<key>.txt` when it has a caption) per kept
image of that source shard.

The source data is never modified: folder images are hard-linked (same inode, no bytes written)
where the filesystem allows and copied otherwise (another device, or `link=False`); tar members
are written from their bytes, each tar opened once. Keys that name sub-folders keep them, so
indexing the export gives back the same keys. A hard link IS the source file: edit an exported
image in place and the source changes too (replace files, never rewrite them).

Re-running is idempotent: the new export is built in a staging folder beside `out_dir` and swapped
in, so the result never mixes two runs. Only a folder that an earlier export wrote (it holds the
marker file) or an empty one is ever replaced.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import polars as pl

MARKER = ".dedup-assets-export.json"


def _dest_name(key: str, src_name: bytes) -> bytes:
    """Relative destination path (bytes) of an image: the unescaped key plus the source extension."""
    from dedup_assets.ingest.shards import unescape

    rel = unescape(key)
    parts = rel.split(b"/")
    if rel.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"key {key!r} is not a plain relative name; refusing to write outside the export")
    ext = os.path.splitext(src_name)[1].lower() or b".jpg"
    return rel + ext


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another export folder")
    if (out_dir / MARKER).is_file() or not any(out_dir.iterdir()):
        return
    raise FileExistsError(
        f"{out_dir} is not empty and was not written by an export (no {MARKER}); refusing to replace "
        "it. Choose a new or empty folder."
    )


def _link_or_copy(src: bytes, dest: bytes, link: bool, counts: dict[str, int]) -> None:
    if link:
        try:
            os.link(src, dest)
            counts["linked"] += 1
            return
        except OSError as e:
            # EXDEV: another device; EPERM/EMLINK/ENOTSUP: a filesystem without (more) hard links.
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    shutil.copyfile(src, dest)
    counts["copied"] += 1


def export_shards(
    kept: pl.DataFrame | Iterable[pl.DataFrame], out_dir: Path, link: bool = True
) -> dict[str, Any]:
    """Write the kept images into img2dataset-style folders `out_dir/<shard>/`.

    `kept`: rows with shard, key, location, caption — one frame, or an iterable of frames (e.g.
    one per shard, so the caller never holds the whole kept set). Returns counts: shards, images, linked,
    copied, from_tar, captions, and out_dir. Raises FileExistsError rather than replace a folder
    this function did not write.
    """
    from dedup_assets.ingest.shards import read_location, split_location

    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    counts = {"shards": 0, "images": 0, "linked": 0, "copied": 0, "from_tar": 0, "captions": 0}
    try:
        made: set[bytes] = set()
        frames = [kept] if isinstance(kept, pl.DataFrame) else kept
        rows = (r for f in frames for r in f.select("shard", "key", "location", "caption").iter_rows(named=True))
        for row in rows:
            shard_dir = os.path.join(os.fsencode(staging), os.fsencode(str(row["shard"])))
            if shard_dir not in made:
                os.makedirs(shard_dir, exist_ok=True)
                made.add(shard_dir)
                counts["shards"] += 1
            loc: str = row["location"]
            path, member = split_location(loc)
            src_name = member if member is not None else path
            dest = os.path.join(shard_dir, _dest_name(row["key"], os.path.basename(src_name)))
            parent = os.path.dirname(dest)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            if member is not None:
                # The location names one member (by header offset): read it through the same
                # safe reader as the index (plain tars by seek, cached member table).
                with open(dest, "wb") as f:
                    f.write(read_location(loc))
                counts["from_tar"] += 1
            else:
                _link_or_copy(src_name, dest, link, counts)
            if row["caption"] is not None:
                with open(os.path.splitext(dest)[0] + b".txt", "wb") as f:
                    f.write(row["caption"].encode("utf-8"))
                counts["captions"] += 1
            counts["images"] += 1
        (staging / MARKER).write_text(json.dumps(counts, sort_keys=True), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Swap: the old export is moved aside first, so out_dir always holds one whole export.
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return {**counts, "out_dir": str(out_dir)}
