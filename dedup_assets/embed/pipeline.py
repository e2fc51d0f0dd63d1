"""The embedding pipeline: decoding and per-image preparation in worker processes, the model in
the main process, bad files recorded instead of raised.

Grain: one vector per successfully decoded input, in input order; one failure row per input that
could not be decoded or prepared.

Why a process pool with windows rather than a torch DataLoader: the input is a stream of bytes
(read sequentially from a tar or a folder by the caller), and decoding is pure Pillow/numpy work;
a `multiprocessing` pool created with the "spawn" method receives the embedder once (pool
initializer), gets windows of `batch_size × workers` inputs, and the main process embeds a window's
prepared arrays while the pool already decodes the next one. Memory stays bounded by two windows.
Each worker limits torch to one thread, so workers and the model do not oversubscribe the cores.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np

from dedup_assets.embed.base import Embedder
from dedup_assets.ingest.decode import DecodeError, decode_rgb


@dataclass
class EmbedResult:
    ids: list[str]
    vectors: np.ndarray
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0


_WORKER_EMBEDDER: Embedder | None = None


def _init_worker(embedder: Embedder) -> None:
    global _WORKER_EMBEDDER
    _WORKER_EMBEDDER = embedder
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # torch is optional for the offline embedder
        pass


def _prepare_one(
    embedder: Embedder, image_id: str, data: bytes, decode_side: int | None
) -> tuple[str, np.ndarray | None, str | None, str | None]:
    try:
        img = decode_rgb(data, target_side=decode_side)
        return image_id, embedder.prepare(img), None, None
    except DecodeError as e:
        return image_id, None, e.reason, str(e)
    except Exception as e:  # a file that decodes but cannot be prepared is recorded, not fatal
        return image_id, None, "prepare_failed", f"{type(e).__name__}: {e}"


def _prepare_task(args: tuple[str, bytes, int | None]):  # noqa: ANN202
    assert _WORKER_EMBEDDER is not None
    return _prepare_one(_WORKER_EMBEDDER, *args)


def _windows(items: Iterable[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def embed_stream(
    embedder: Embedder,
    items: Iterable[tuple[str, bytes]],
    *,
    batch_size: int = 64,
    workers: int = 2,
    decode_side: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 256,
) -> EmbedResult:
    """Embed (image_id, file bytes) pairs; workers=0 runs everything in this process."""
    if batch_size < 1 or workers < 0:
        raise ValueError("batch_size must be >= 1 and workers >= 0")
    started = time.perf_counter()
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    failures: list[tuple[str, str, str]] = []
    window = batch_size * max(workers, 1)
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(embedder,)) if workers else None
    last = 0
    try:
        pending = None
        for chunk in _windows(items, window):
            tasks = [(i, d, decode_side) for i, d in chunk]
            if pool is not None:
                current = pool.map_async(_prepare_task, tasks, chunksize=max(1, batch_size // 4))
            else:
                current = [_prepare_one(embedder, *t) for t in tasks]
            if pending is not None:
                _consume(embedder, pending, batch_size, ids, vecs, failures)
            pending = current
            if progress and len(ids) - last >= progress_every:
                last = len(ids)
                progress(len(ids), time.perf_counter() - started)
        if pending is not None:
            _consume(embedder, pending, batch_size, ids, vecs, failures)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - started
    if progress:
        progress(len(ids), seconds)
    vectors = np.concatenate(vecs).astype(np.float32, copy=False) if vecs else np.zeros((0, embedder.dim), np.float32)
    return EmbedResult(ids, vectors, failures, seconds, len(ids) / max(seconds, 1e-9))


def _consume(embedder, pending, batch_size, ids, vecs, failures) -> None:  # noqa: ANN001
    results = pending.get() if hasattr(pending, "get") else pending
    ok = [(i, p) for i, p, reason, err in results if p is not None]
    failures.extend((i, reason, err) for i, p, reason, err in results if p is None)
    for b in range(0, len(ok), batch_size):
        part = ok[b : b + batch_size]
        out = np.asarray(embedder.embed_prepared([p for _, p in part]), dtype=np.float32)
        if out.shape != (len(part), embedder.dim):
            raise RuntimeError(f"embedder returned shape {out.shape}, expected {(len(part), embedder.dim)}")
        ids.extend(i for i, _ in part)
        vecs.append(out)
