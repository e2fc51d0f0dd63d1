"""Exports of the kept set for training: a Parquet manifest, and optionally new shards.

The source data is never modified. New shards are img2dataset-style folders (one per source
shard) holding only kept images plus `<key>.txt` captions; images are hard-linked where the
filesystem allows (same device), copied otherwise, and tar members are written from their bytes.
Re-running replaces what a previous export wrote (idempotent).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl


def write_manifest(kept: pl.DataFrame, path: Path) -> Path:
    """The kept rows with weights as Parquet (atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    kept.write_parquet(tmp)
    os.replace(tmp, path)
    return path


def export_shards(kept: pl.DataFrame, out_dir: Path, link: bool = True) -> dict[str, Any]:
    """Write kept images into `out_dir/<shard>/`; returns counts of links, copies and members written."""
    from dedup_assets.ingest.shards import TAR_SEPARATOR, read_location, unescape

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    counts = {"linked": 0, "copied": 0, "from_tar": 0, "shards": 0}
    for shard, rows in kept.group_by("shard", maintain_order=True):
        shard_dir = out_dir / str(shard[0])
        shard_dir.mkdir(parents=True, exist_ok=True)
        counts["shards"] += 1
        for r in rows.iter_rows(named=True):
            loc = r["location"]
            src_name = loc.rsplit(TAR_SEPARATOR, 1)[-1] if ".tar" + TAR_SEPARATOR in loc else loc
            ext = os.path.splitext(src_name)[1].lower() or ".jpg"
            key = r["key"].replace("/", "__")
            dest = os.path.join(os.fsencode(shard_dir), unescape(key) + ext.encode())
            if ".tar" + TAR_SEPARATOR in loc:
                with open(dest, "wb") as f:
                    f.write(read_location(loc))
                counts["from_tar"] += 1
            else:
                src = unescape(loc)
                try:
                    if not link:
                        raise OSError("copy requested")
                    os.link(src, dest)
                    counts["linked"] += 1
                except OSError:
                    shutil.copyfile(src, dest)
                    counts["copied"] += 1
            if r.get("caption") is not None:
                with open(os.path.join(os.fsencode(shard_dir), unescape(key) + b".txt"), "w", encoding="utf-8") as f:
                    f.write(r["caption"])
    return counts
