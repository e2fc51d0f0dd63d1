"""Regurgitation audit: the nearest training images of each generated image.

Grain: one row per (generated image, rank) for the top-k neighbours over the WHOLE indexed
training set (before deduplication and filtering — a near-copy of a removed image still tells
that the model saw it). Exact inner-product search (faiss IndexFlatIP) up to `flat_max` training
vectors; above that an IVF index (IndexIVFFlat, nlist ≈ 4·√n, `nprobe` lists probed), which is
approximate but keeps the audit fast on millions of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from dedup_assets.ingest.shards import IMAGE_EXTENSIONS

AUDIT_SCHEMA: dict[str, pl.DataType] = {
    "generated": pl.String,
    "prompt": pl.String,
    "rank": pl.Int32,
    "image_id": pl.String,
    "similarity": pl.Float32,
    "flagged": pl.Boolean,
    "kept_in_filtered": pl.Boolean,
}


@dataclass(frozen=True)
class AuditConfig:
    top_k: int = 5
    threshold: float | None = None  # None → the embedder's duplicate_threshold
    flat_max: int = 200_000
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.flat_max < 1 or self.nprobe < 1:
            raise ValueError("top_k, flat_max and nprobe must be >= 1")


def nearest_training(
    gen: np.ndarray, train: np.ndarray, k: int, flat_max: int = 200_000, nprobe: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of shape (n_gen, min(k, n_train)); -1 where fewer neighbours exist."""
    import faiss

    gen = np.ascontiguousarray(gen, dtype=np.float32)
    train = np.ascontiguousarray(train, dtype=np.float32)
    k = max(1, min(k, train.shape[0]))
    if train.shape[0] == 0 or gen.shape[0] == 0:
        return np.zeros((gen.shape[0], 0), np.float32), np.zeros((gen.shape[0], 0), np.int64)
    d = train.shape[1]
    if train.shape[0] <= flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, int(4 * math.sqrt(train.shape[0])))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = train[rng.choice(train.shape[0], min(train.shape[0], 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = nprobe
    index.add(train)
    sims, idx = index.search(gen, k)
    return sims, idx


def audit(
    gen_ids: Sequence[str],
    gen_prompts: Sequence[str | None],
    gen_vectors: np.ndarray,
    train_ids: Sequence[str],
    train_vectors: np.ndarray,
    kept_ids: Iterable[str] | pl.Series,
    cfg: AuditConfig,
    threshold: float,
) -> pl.DataFrame:
    """The audit table (AUDIT_SCHEMA), flagged rows first within each generated image's ranks."""
    kept = set(kept_ids.to_list() if isinstance(kept_ids, pl.Series) else kept_ids)
    sims, idx = nearest_training(gen_vectors, train_vectors, cfg.top_k, cfg.flat_max, cfg.nprobe)
    rows = []
    for g, gid in enumerate(gen_ids):
        for r in range(idx.shape[1]):
            t = int(idx[g, r])
            if t < 0:
                continue
            tid = train_ids[t]
            sim = float(sims[g, r])
            rows.append((gid, gen_prompts[g], r + 1, tid, sim, sim >= threshold, tid in kept))
    return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row").sort("generated", "rank")


def discover_generated(folder: Path) -> list[tuple[str, Path, str | None]]:
    """(id = path relative to folder, path, prompt from <stem>.txt) for every image, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"generated-images folder {folder} does not exist")
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            side = p.with_suffix(".txt")
            prompt = side.read_text(encoding="utf-8", errors="replace").strip() if side.exists() else None
            out.append((p.relative_to(folder).as_posix(), p, prompt))
    return out
