"""Regurgitation audit: the nearest training images of each generated image.

Grain: one row per (generated image, rank) for its top-k neighbours over the WHOLE indexed
training set, before deduplication and filtering — a near-copy of a removed image still tells that
the model saw it; `kept_in_filtered` says whether the neighbour survived into the filtered set.

Search: cosine similarity as the inner product of L2-normalized vectors. Up to `flat_max`
training vectors the search is exact (brute force). Above it, an IVF index
(`faiss.IndexIVFFlat`, nlist ≈ 4·√n, trained on a seeded sample of 64·nlist vectors) probes
`nprobe` of the nlist lists per query: approximate, but a near-copy lies in the same list as its
source almost always, and the audit stays fast on millions of images. Raise `nprobe` (up to
nlist = exact) to trade speed for recall.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

AUDIT_SCHEMA: dict[str, pl.DataType] = {
    "generated": pl.String,
    "prompt": pl.String,
    "rank": pl.Int32,
    "image_id": pl.String,
    "similarity": pl.Float32,
    "flagged": pl.Boolean,
    "kept_in_filtered": pl.Boolean,
}

# faiss warns below ~39 training points per list; keep at least this many vectors per list.
_MIN_POINTS_PER_LIST = 39
_TRAIN_POINTS_PER_LIST = 64
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AuditConfig:
    """top_k neighbours per generated image; threshold (cosine) at/above which a neighbour is a
    near-copy, None → the embedder's duplicate_threshold; flat_max: largest training set searched
    exactly; nprobe: IVF lists probed above it."""

    top_k: int = 5
    threshold: float | None = None
    flat_max: int = 200_000
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (neighbours per generated image), got {self.top_k}")
        if self.flat_max < 1:
            raise ValueError(f"flat_max must be >= 1 (training vectors searched exactly), got {self.flat_max}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1 (IVF lists probed per query), got {self.nprobe}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold is a cosine similarity in [-1, 1] (or None for the embedder's); got {self.threshold}"
            )

    def resolved_threshold(self, embedder_threshold: float) -> float:
        """The threshold to flag at: this config's, or else the embedder's calibrated one."""
        return float(self.threshold if self.threshold is not None else embedder_threshold)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for n training vectors: ≈ 4·√n, but at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))


def nearest_training(
    gen: np.ndarray, train: np.ndarray, k: int, flat_max: int = 200_000, nprobe: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities float32, row indices int64), both (n_gen, min(k, n_train)), best first.

    Inner product of the rows as given (pass L2-normalized vectors for cosine). Exact when
    n_train <= flat_max, IVF otherwise; -1 marks a neighbour IVF could not fill.
    """
    import faiss

    gen = np.ascontiguousarray(gen, dtype=np.float32)
    train = np.ascontiguousarray(train, dtype=np.float32)
    if gen.ndim != 2 or train.ndim != 2 or (gen.shape[0] and train.shape[0] and gen.shape[1] != train.shape[1]):
        raise ValueError(f"need 2-D arrays of one dimension; got generated {gen.shape}, training {train.shape}")
    n = train.shape[0]
    k = min(k, n)
    if n == 0 or gen.shape[0] == 0 or k == 0:
        return np.zeros((gen.shape[0], 0), np.float32), np.zeros((gen.shape[0], 0), np.int64)
    if n <= flat_max:
        # Brute force without building an index: no copy of the training matrix.
        sims, idx = faiss.knn(gen, train, k, metric=faiss.METRIC_INNER_PRODUCT)
        return sims.astype(np.float32), idx.astype(np.int64)
    d = train.shape[1]
    nlist = ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    m = min(n, _TRAIN_POINTS_PER_LIST * nlist)
    sample = train if m == n else train[np.sort(rng.choice(n, m, replace=False))]
    index.train(sample)
    index.add(train)
    index.nprobe = min(nprobe, nlist)
    sims, idx = index.search(gen, k)
    return sims.astype(np.float32), idx.astype(np.int64)


def _check_normalized(x: np.ndarray, what: str) -> None:
    if x.shape[0] == 0:
        return
    step = 65_536  # in blocks: the training matrix can be large
    for s in range(0, x.shape[0], step):
        norms = np.linalg.norm(np.asarray(x[s : s + step], dtype=np.float32), axis=1)
        # Zero rows are allowed: l2_normalize leaves an all-zero descriptor at zero (similarity 0).
        bad = (np.abs(norms - 1.0) > _NORM_TOLERANCE) & (norms > _NORM_TOLERANCE)
        if bad.any():
            raise ValueError(
                f"{what} vectors must be L2-normalized (cosine = inner product); row "
                f"{s + int(np.argmax(bad))} has norm {norms[bad][0]:.4f}. Normalize them (embedders do) "
                "before the audit."
            )


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
    """The audit table (AUDIT_SCHEMA), sorted by (generated, rank).

    `train_*` must be the whole training set before dedup/filtering; `kept_ids` the ids of
    filtered_dataset; `threshold` the resolved cosine threshold (see AuditConfig.resolved_threshold).
    """
    if not (len(gen_ids) == len(gen_prompts) == gen_vectors.shape[0]):
        raise ValueError(
            f"gen_ids ({len(gen_ids)}), gen_prompts ({len(gen_prompts)}) and gen_vectors "
            f"({gen_vectors.shape[0]}) must have one entry per generated image"
        )
    if len(train_ids) != train_vectors.shape[0]:
        raise ValueError(f"train_ids ({len(train_ids)}) and train_vectors ({train_vectors.shape[0]}) differ in length")
    _check_normalized(gen_vectors, "generated")
    _check_normalized(train_vectors, "training")
    kept = set(kept_ids.cast(pl.String).to_list() if isinstance(kept_ids, pl.Series) else kept_ids)
    sims, idx = nearest_training(gen_vectors, train_vectors, cfg.top_k, cfg.flat_max, cfg.nprobe)
    tids = np.asarray(train_ids, dtype=object)
    rows = []
    for g, gid in enumerate(gen_ids):
        for r in range(idx.shape[1]):
            t = int(idx[g, r])
            if t < 0:
                continue
            tid = str(tids[t])
            sim = float(sims[g, r])
            rows.append((gid, gen_prompts[g], r + 1, tid, sim, sim >= threshold, tid in kept))
    return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row").sort("generated", "rank")


def discover_generated(folder: Path) -> list[tuple[str, Path, str | None]]:
    """(id, path, prompt) for every image under `folder`, nested folders walked, sorted by id.

    id = the path relative to `folder` (POSIX separators); prompt = the stripped text of the
    sidecar `<stem>.txt` beside the image, or None. Hidden files and folders are skipped.
    """
    from dedup_assets.ingest.shards import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"generated-images folder {folder} does not exist or is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            p = Path(dirpath) / fn
            if fn.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            side = p.with_suffix(".txt")
            prompt = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else None
            out.append((p.relative_to(folder).as_posix(), p, prompt))
    return sorted(out, key=lambda t: t[0])
