"""The per-shard index frame: one row per image file found, including the ones that fail.

Grain: one row per image file of one shard (a file with an image extension; its sidecars are
folded into the row). Rows are sorted by image_id = f"{shard}/{key}", which is unique: a second
image with the same base name keeps its extension in the key (`a.jpg` → "a", `a.png` → "a.png";
rule in `dedup_assets.ingest.shards`). No Dagster here.

Columns (`INDEX_SCHEMA`, in this order): caption from `<key>.txt`, else the JSON sidecar's
"caption"; url from the JSON "url"; metadata = the JSON sidecar re-serialized (sorted keys) or
null; bytes and sha256 of the file (sha256 null when the file was not read: a link out of the
root, a FIFO, a file above the size cap, ...); format/width/height/mode/status/error from `probe` (width and
height after EXIF orientation, mode as stored). status is "ok" or a reason (see
`dedup_assets.ingest.decode`, plus "unreadable" for a file that could not be read); a sidecar
problem never changes status and is appended to error as "sidecar: ...".
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable

import polars as pl

from dedup_assets.batching import batched
from dedup_assets.ingest.decode import DecodeLimits, ProbeResult, probe
from dedup_assets.ingest.shards import ReadLimits, Record, Shard, Skipped, iter_shard

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


def _metadata_json(meta: dict[str, Any] | None) -> str | None:
    if meta is None:
        return None
    try:
        return json.dumps(meta, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except ValueError:  # NaN/Infinity are not JSON; keep them readable rather than drop the row
        return json.dumps(meta, ensure_ascii=False, sort_keys=True)


def _row(shard: Shard, rec: Record, res: ProbeResult | None) -> dict[str, Any]:
    url = rec.meta.get("url") if rec.meta is not None else None
    if res is None:  # the bytes could not be read
        res = ProbeResult(rec.read_status or "unreadable", rec.read_error, None, None, None, None)
    error = res.error
    if rec.sidecar_error:
        error = f"{error}; sidecar: {rec.sidecar_error}" if error else f"sidecar: {rec.sidecar_error}"
    return {
        "image_id": f"{shard.name}/{rec.key}",
        "shard": shard.name,
        "key": rec.key,
        "location": rec.location,
        "caption": rec.caption,
        "url": url if isinstance(url, str) else None,
        "metadata": _metadata_json(rec.meta),
        "bytes": len(rec.data),
        "sha256": hashlib.sha256(rec.data).hexdigest() if rec.read_status is None else None,
        "format": res.format,
        "width": res.width,
        "height": res.height,
        "mode": res.mode,
        "status": res.status,
        "error": error,
    }


def _crash(exc: BaseException) -> ProbeResult:
    msg = f"the decoder process died on this file ({type(exc).__name__})"
    return ProbeResult("decoder_crash", msg, None, None, None, None)


class _Prober:
    """`probe` in this process (workers=1) or in a pool of spawned processes.

    A file that kills a worker (a decoder crash on hostile bytes) becomes a "decoder_crash" row:
    the window it was in is retried one file at a time in a fresh pool.
    """

    def __init__(self, workers: int, limits: DecodeLimits) -> None:
        self.workers, self.limits = workers, limits
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            # spawn, not fork: the caller may be a threaded Dagster process.
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self.pool

    def _reset(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def run(self, datas: list[bytes]) -> list[ProbeResult]:
        if self.workers == 1:
            return [probe(d, self.limits) for d in datas]
        try:
            return list(self._pool().map(probe, datas, [self.limits] * len(datas), chunksize=8))
        except BrokenProcessPool:
            self._reset()
        out = []
        for d in datas:
            try:
                out.append(self._pool().submit(probe, d, self.limits).result())
            except BrokenProcessPool as e:
                self._reset()
                out.append(_crash(e))
        if len(datas) > 1 and all(r.status == "decoder_crash" for r in out):
            # Not one hostile file: the workers cannot run at all. Say so instead of filling
            # the index with crash rows.
            raise RuntimeError(
                f"every decode worker process died ({len(datas)} files in a row); the worker "
                "processes cannot start or run here. Try workers=1."
            )
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def index_shard(
    shard: Shard,
    limits: DecodeLimits = DecodeLimits(),
    workers: int = 1,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 500,
    read_limits: ReadLimits = ReadLimits(),
    skipped: list[Skipped] | None = None,
) -> pl.DataFrame:
    """Read, hash and probe every image file of a shard; one row per file, schema `INDEX_SCHEMA`.

    Files are streamed (a tar is read once); with workers > 1 decoding runs in that many spawned
    processes (bytes in, ProbeResult out) over windows of files, so memory stays bounded by the
    window. `progress(n_done, elapsed_s)` is called about every `progress_every` files and once
    at the end. Entries that give no row are appended to `skipped` (see `skipped_frame`).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: give 1 (decode in this process) or more worker processes")
    if progress_every < 1:
        raise ValueError(f"progress_every={progress_every!r}: give a number of files >= 1")
    if workers > 1 and mp.current_process().daemon:
        workers = 1  # a daemonic process (e.g. a Celery worker's child) may not start processes
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    window = 16 if workers == 1 else max(64, 32 * workers)
    prober = _Prober(workers, limits)
    next_report = progress_every
    try:
        for recs in batched(iter_shard(shard, read_limits, skipped), window):
            readable = [r for r in recs if r.read_status is None]
            results = iter(prober.run([r.data for r in readable]))
            rows.extend(_row(shard, r, next(results) if r.read_status is None else None) for r in recs)
            if progress is not None and len(rows) >= next_report:
                progress(len(rows), time.perf_counter() - started)
                next_report = (len(rows) // progress_every + 1) * progress_every
    finally:
        prober.close()
    if progress is not None:
        progress(len(rows), time.perf_counter() - started)
    return pl.DataFrame(rows, schema=INDEX_SCHEMA).sort("image_id")


SKIPPED_SCHEMA: dict[str, pl.DataType] = {
    "shard": pl.String,
    "entry": pl.String,
    "reason": pl.String,
    "detail": pl.String,
}


def skipped_frame(shard: str, skipped: Iterable[Skipped]) -> pl.DataFrame:
    """One row per entry of a shard that gives no index row (grain: one file or tar member)."""
    rows = [{"shard": shard, "entry": s.entry, "reason": s.reason, "detail": s.detail} for s in skipped]
    return pl.DataFrame(rows, schema=SKIPPED_SCHEMA).sort("entry", "reason")


def summarize_index(df: pl.DataFrame) -> dict[str, Any]:
    """Counts for asset metadata: rows, ok, rejected by reason, total bytes, captions, urls."""
    if df.height == 0:
        return {"rows": 0, "ok": 0, "rejected_by_reason": {}, "total_bytes": 0, "with_caption": 0, "with_url": 0}
    rejected = df.filter(pl.col("status") != "ok").group_by("status").len().sort("status")
    return {
        "rows": df.height,
        "ok": int((df["status"] == "ok").sum()),
        "rejected_by_reason": {s: int(n) for s, n in rejected.iter_rows()},
        "total_bytes": int(df["bytes"].sum()),
        "with_caption": int(df["caption"].is_not_null().sum()),
        "with_url": int(df["url"].is_not_null().sum()),
    }
