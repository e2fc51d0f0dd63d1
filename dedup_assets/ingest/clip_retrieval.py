"""Bring-your-own embeddings: the clip-retrieval / LAION layout, read without any image file.

    DIR/img_emb/img_emb_{i}.npy          N_i × d, float16 or float32 (read with mmap, in batches)
    DIR/metadata/metadata_{i}.parquet    N_i rows in the same order (key, image_path, url, caption, …)

Each file pair is one partition, keyed `emb_{i}` with `i` spelled as in the file name
(`img_emb_007.npy` → `emb_007`). Grain of `index_frame`: one row per metadata row, in
`INDEX_SCHEMA`: image_id = `<partition>/<key>`, key = the `key` column, else the stem of
`image_path`, else the row number (9 digits); caption from `caption` (else `text`/`TEXT`), url
from `url` (else `URL`), location = `image_path` (may not exist on this machine: thumbnails then
show a placeholder), width/height from `width`/`height` when present, metadata = every other
column as JSON; bytes/sha256/format/mode are null (no image data). status is `ok`, or
`bad_embedding` (error `non_finite` or `zero_vector`: that row gets no vector) or `duplicate_key`
(the key repeats an earlier row of the partition; image_id gets `#<row>` appended so it stays
unique, and no vector).

Vectors are L2-normalized in float32 on the way into the store (clip-retrieval's are normalized
already; the count of rows whose norm was off by more than 1e-3 is reported).

Bad input raises `EmbeddingsInputError` naming the file: a missing img_emb folder, a npy without
its metadata file (or the reverse), an unreadable npy or one that is not a 2-D float array, a
dimension that differs between files, row counts that differ between a npy and its parquet.
No Dagster here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from dedup_assets.ingest.index import INDEX_SCHEMA

NPY_DIR = "img_emb"
META_DIR = "metadata"
_NPY = re.compile(r"^img_emb_(.+)\.npy$")
_META = re.compile(r"^metadata_(.+)\.parquet$")
NORM_TOLERANCE = 1e-3
_CAPTION_COLUMNS = ("caption", "text", "TEXT")
_URL_COLUMNS = ("url", "URL")


class EmbeddingsInputError(ValueError):
    """Input in the clip-retrieval layout that cannot be used; the message names the file."""


@dataclass(frozen=True)
class EmbeddingPart:
    """One file pair = one partition."""

    partition: str
    npy: Path
    metadata: Path


def partition_key(index: str) -> str:
    return f"emb_{index}"


def _order(index: str) -> tuple[int, int | str]:
    return (0, int(index)) if index.isdigit() else (1, index)


def discover_parts(root: str | Path) -> list[EmbeddingPart]:
    """The file pairs under `root`, in numeric order of i; raises on a missing half of a pair."""
    root = Path(root)
    npy_dir, meta_dir = root / NPY_DIR, root / META_DIR
    if not npy_dir.is_dir():
        raise EmbeddingsInputError(
            f"{npy_dir}: no such folder; --embeddings expects the clip-retrieval layout "
            f"img_emb/img_emb_{{i}}.npy + metadata/metadata_{{i}}.parquet"
        )
    npys = {m.group(1): p for p in npy_dir.iterdir() if (m := _NPY.match(p.name))}
    metas = {m.group(1): p for p in meta_dir.iterdir() if (m := _META.match(p.name))} if meta_dir.is_dir() else {}
    if not npys:
        raise EmbeddingsInputError(f"{npy_dir}: no img_emb_{{i}}.npy files")
    for i in sorted(npys, key=_order):
        if i not in metas:
            raise EmbeddingsInputError(
                f"{meta_dir / f'metadata_{i}.parquet'}: missing; {npys[i]} needs its metadata file "
                f"(rows in the same order)"
            )
    for i in sorted(set(metas) - set(npys), key=_order):
        raise EmbeddingsInputError(f"{metas[i]}: has no vectors file {npy_dir / f'img_emb_{i}.npy'}")
    return [EmbeddingPart(partition_key(i), npys[i], metas[i]) for i in sorted(npys, key=_order)]


def find_part(root: str | Path, partition: str) -> EmbeddingPart:
    for part in discover_parts(root):
        if part.partition == partition:
            return part
    raise EmbeddingsInputError(f"no file pair for partition {partition!r} under {root}")


def open_vectors(part: EmbeddingPart) -> np.ndarray:
    """The (N, d) vectors of one file, memory-mapped (nothing is read until sliced)."""
    try:
        x = np.load(part.npy, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a truncated file, a pickle, not a .npy at all
        raise EmbeddingsInputError(f"{part.npy}: cannot be read as a .npy array ({type(e).__name__}: {e})") from e
    if x.ndim != 2 or x.shape[1] < 1:
        raise EmbeddingsInputError(f"{part.npy}: expected an N×d array, got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32):
        raise EmbeddingsInputError(f"{part.npy}: expected float16 or float32 vectors, got {x.dtype}")
    return x


def metadata_rows(part: EmbeddingPart) -> int:
    try:
        return int(pq.ParquetFile(part.metadata).metadata.num_rows)
    except Exception as e:
        raise EmbeddingsInputError(f"{part.metadata}: cannot be read as Parquet ({type(e).__name__}: {e})") from e


def validate_parts(parts: list[EmbeddingPart]) -> int:
    """Check headers only (shapes, dtypes, row counts); returns d. Raises naming the bad file."""
    dim: int | None = None
    first: Path | None = None
    for part in parts:
        x = open_vectors(part)
        n_meta = metadata_rows(part)
        if x.shape[0] != n_meta:
            raise EmbeddingsInputError(
                f"{part.npy} has {x.shape[0]} rows but {part.metadata} has {n_meta}: rows must pair up in order"
            )
        if dim is None:
            dim, first = int(x.shape[1]), part.npy
        elif x.shape[1] != dim:
            raise EmbeddingsInputError(
                f"{part.npy} has dimension {x.shape[1]} but {first} has {dim}: all files must share one model"
            )
    return int(dim or 0)


def iter_batches(part: EmbeddingPart, batch_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 copy of rows first..first+b) over the memory-mapped file."""
    x = open_vectors(part)
    for start in range(0, x.shape[0], batch_rows):
        yield start, np.asarray(x[start : start + batch_rows], dtype=np.float32)


def row_quality(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: non-finite mask, zero-vector mask, and the L2 norms (0 where non-finite)."""
    finite = np.isfinite(batch).all(axis=1)
    norms = np.zeros(batch.shape[0], dtype=np.float32)
    if finite.any():
        norms[finite] = np.linalg.norm(batch[finite].astype(np.float64), axis=1).astype(np.float32)
    return ~finite, finite & (norms <= 1e-12), norms


def normalized(batch: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch / norms[:, None], dtype=np.float32)


def _first(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in columns), None)


def _read_metadata(part: EmbeddingPart) -> pl.DataFrame:
    try:
        return pl.read_parquet(part.metadata)
    except Exception as e:
        raise EmbeddingsInputError(f"{part.metadata}: cannot be read as Parquet ({type(e).__name__}: {e})") from e


def row_ids(part: EmbeddingPart, meta: pl.DataFrame | None = None) -> tuple[list[str], list[str], list[bool]]:
    """Per metadata row: image_id, key, and whether the key repeats an earlier row."""
    meta = _read_metadata(part) if meta is None else meta
    n = meta.height
    keys: list[str | None] = [None] * n
    if "key" in meta.columns:
        keys = [None if v is None or str(v) == "" else str(v) for v in meta["key"].to_list()]
    if "image_path" in meta.columns and any(k is None for k in keys):
        paths = meta["image_path"].to_list()
        keys = [k if k is not None else (PurePath(str(p)).stem or None if p else None) for k, p in zip(keys, paths)]
    keys = [k if k is not None else f"{r:09d}" for r, k in enumerate(keys)]
    seen: set[str] = set()
    ids, repeated = [], []
    for r, k in enumerate(keys):
        dup = k in seen
        seen.add(k)
        repeated.append(dup)
        ids.append(f"{part.partition}/{k}#{r}" if dup else f"{part.partition}/{k}")
    return ids, keys, repeated  # type: ignore[return-value]


@dataclass
class IndexStats:
    rows: int
    ok: int
    non_finite: int
    zero_vector: int
    duplicate_key: int
    renormalized: int
    dim: int


def index_frame(part: EmbeddingPart, batch_rows: int = 65536) -> tuple[pl.DataFrame, IndexStats]:
    """The image_index rows of one partition (INDEX_SCHEMA, sorted by image_id) and its counts.

    Reads the metadata of this one partition and streams its vectors once to find bad rows.
    """
    x = open_vectors(part)
    meta = _read_metadata(part)
    if meta.height != x.shape[0]:
        raise EmbeddingsInputError(
            f"{part.npy} has {x.shape[0]} rows but {part.metadata} has {meta.height}: rows must pair up in order"
        )
    ids, keys, repeated = row_ids(part, meta)
    n = meta.height
    status = ["duplicate_key" if d else "ok" for d in repeated]
    error: list[str | None] = [None] * n
    counts = {"non_finite": 0, "zero_vector": 0, "renormalized": 0}
    for start, batch in iter_batches(part, batch_rows):
        bad_nf, bad_zero, norms = row_quality(batch)
        for r in np.flatnonzero(bad_nf | bad_zero).tolist():
            why = "non_finite" if bad_nf[r] else "zero_vector"
            counts[why] += 1
            status[start + r], error[start + r] = "bad_embedding", why
        good = ~(bad_nf | bad_zero)
        counts["renormalized"] += int((np.abs(norms[good] - 1.0) > NORM_TOLERANCE).sum())
    cols = meta.columns
    cap_col, url_col = _first(cols, _CAPTION_COLUMNS), _first(cols, _URL_COLUMNS)
    used = {c for c in ("key", "image_path", "width", "height", cap_col, url_col) if c}
    others = [c for c in cols if c not in used]

    def str_col(name: str | None) -> pl.Series:
        if name is None:
            return pl.Series([None] * n, dtype=pl.String)
        return meta[name].cast(pl.String, strict=False)

    def int_col(name: str) -> pl.Series:
        if name not in cols:
            return pl.Series([None] * n, dtype=pl.Int32)
        return meta[name].cast(pl.Int32, strict=False)

    metadata = (
        meta.select(pl.struct(others).struct.json_encode()).to_series()
        if others else pl.Series([None] * n, dtype=pl.String)
    )
    df = pl.DataFrame(
        {
            "image_id": ids,
            "shard": [part.partition] * n,
            "key": keys,
            "location": str_col("image_path" if "image_path" in cols else None),
            "caption": str_col(cap_col),
            "url": str_col(url_col),
            "metadata": metadata,
            "bytes": pl.Series([None] * n, dtype=pl.Int64),
            "sha256": pl.Series([None] * n, dtype=pl.String),
            "format": pl.Series([None] * n, dtype=pl.String),
            "width": int_col("width"),
            "height": int_col("height"),
            "mode": pl.Series([None] * n, dtype=pl.String),
            "status": status,
            "error": error,
        },
        schema=INDEX_SCHEMA,
    ).sort("image_id")
    stats = IndexStats(
        rows=n,
        ok=status.count("ok"),
        non_finite=counts["non_finite"],
        zero_vector=counts["zero_vector"],
        duplicate_key=sum(repeated),
        renormalized=counts["renormalized"],
        dim=int(x.shape[1]),
    )
    return df, stats


def iter_ok_vectors(
    part: EmbeddingPart, ok_ids: set[str], batch_rows: int = 65536
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(image_ids, unit-norm float32 vectors) of the rows whose id is in `ok_ids`, in file order.

    Rows that are non-finite or zero are skipped even when listed (they can have no unit vector).
    """
    ids, _, _ = row_ids(part)
    for start, batch in iter_batches(part, batch_rows):
        bad_nf, bad_zero, norms = row_quality(batch)
        keep = [r for r in range(batch.shape[0]) if not (bad_nf[r] or bad_zero[r]) and ids[start + r] in ok_ids]
        if keep:
            sel = np.asarray(keep)
            yield [ids[start + r] for r in keep], normalized(batch[sel], norms[sel])


def read_generated(root: str | Path, batch_rows: int = 65536) -> tuple[list[str], list[str | None], np.ndarray, list[tuple[str, str]]]:
    """Generated-image vectors in the same layout, for the audit (a query set: held in memory).

    Returns ids (`<partition>/<key>`), prompts (the caption column), unit-norm float32 vectors, and
    the (id, reason) of every row left out (non_finite, zero_vector, duplicate_key).
    """
    parts = discover_parts(root)
    dim = validate_parts(parts)
    ids_out: list[str] = []
    prompts: list[str | None] = []
    mats: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for part in parts:
        meta = _read_metadata(part)
        ids, _, repeated = row_ids(part, meta)
        cap_col = _first(meta.columns, _CAPTION_COLUMNS)
        caps = meta[cap_col].cast(pl.String, strict=False).to_list() if cap_col else [None] * meta.height
        for start, batch in iter_batches(part, batch_rows):
            bad_nf, bad_zero, norms = row_quality(batch)
            keep = []
            for r in range(batch.shape[0]):
                why = "non_finite" if bad_nf[r] else "zero_vector" if bad_zero[r] else (
                    "duplicate_key" if repeated[start + r] else None)
                if why:
                    skipped.append((ids[start + r], why))
                else:
                    keep.append(r)
            if keep:
                sel = np.asarray(keep)
                mats.append(normalized(batch[sel], norms[sel]))
                ids_out.extend(ids[start + r] for r in keep)
                prompts.extend(caps[start + r] for r in keep)
    x = np.concatenate(mats) if mats else np.zeros((0, dim), dtype=np.float32)
    return ids_out, prompts, x, skipped
