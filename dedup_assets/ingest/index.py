"""The per-shard index frame: one row per image file found, including the ones that fail.

Grain: one row per image file of one shard (a second image with the same base name, e.g. `a.jpg`
and `a.png`, keeps its extension in the key: `a` and `a.png`). Sorted by image_id.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import polars as pl

from dedup_assets.ingest.decode import DecodeLimits, ProbeResult, probe
from dedup_assets.ingest.shards import Record, Shard, iter_shard

INDEX_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "location": pl.String,
    "caption": pl.String,
    "url": pl.String,
    "metadata": pl.String,
    "bytes": pl.Int64,
    "sha256": pl.String,
    "format": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "mode": pl.String,
    "status": pl.String,
    "error": pl.String,
}

WINDOW = 256  # records in flight at once: bounds memory with a process pool


def _probe_task(args: tuple[bytes, DecodeLimits]) -> ProbeResult:
    return probe(*args)


def _windows(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _row(shard: Shard, rec: Record, res: ProbeResult) -> dict[str, Any]:
    url = rec.meta.get("url") if rec.meta and isinstance(rec.meta.get("url"), str) else None
    error = res.error
    if rec.sidecar_error:
        error = f"{error}; {rec.sidecar_error}" if error else rec.sidecar_error
    return {
        "image_id": f"{shard.name}/{rec.key}",
        "shard": shard.name,
        "key": rec.key,
        "location": rec.location,
        "caption": rec.caption,
        "url": url,
        "metadata": json.dumps(rec.meta, ensure_ascii=False, sort_keys=True) if rec.meta is not None else None,
        "bytes": len(rec.data),
        "sha256": hashlib.sha256(rec.data).hexdigest(),
        "format": res.format,
        "width": res.width,
        "height": res.height,
        "mode": res.mode,
        "status": res.status,
        "error": error,
    }


def index_shard(
    shard: Shard,
    limits: DecodeLimits = DecodeLimits(),
    workers: int = 1,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 500,
) -> pl.DataFrame:
    """Read, hash and probe every image file of a shard (decoding in `workers` processes)."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    last_report = 0
    try:
        for window in _windows(iter_shard(shard), WINDOW):
            tasks = [(r.data, limits) for r in window]
            results = pool.map(_probe_task, tasks, chunksize=8) if pool else [_probe_task(t) for t in tasks]
            rows.extend(_row(shard, r, res) for r, res in zip(window, results))
            if progress and len(rows) - last_report >= progress_every:
                last_report = len(rows)
                progress(len(rows), time.perf_counter() - started)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress:
        progress(len(rows), time.perf_counter() - started)
    return pl.DataFrame(rows, schema=INDEX_SCHEMA).sort("image_id")


def summarize_index(df: pl.DataFrame) -> dict[str, Any]:
    """Counts for metadata: rows, ok, rejected by reason, total bytes."""
    rejected = df.filter(pl.col("status") != "ok").group_by("status").len()
    return {
        "rows": df.height,
        "ok": int((df["status"] == "ok").sum()) if df.height else 0,
        "rejected_by_reason": {s: int(n) for s, n in rejected.iter_rows()},
        "total_bytes": int(df["bytes"].sum()) if df.height else 0,
    }
