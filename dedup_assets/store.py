"""The embedding store: one Parquet file of vectors per partition, next to the warehouse.

Layout: `<warehouse stem>_files/embeddings/<escaped partition key>.parquet`. Each file holds one
partition's vectors in the order they were written, with the columns

    partition  string                    (the partition key; dictionary-encoded, ~0 bytes/row)
    image_id   string                    (the key of record)
    row        int32                     (0..n-1, position within the partition)
    embedding  fixed_size_list<float32>[d]   (stored uncompressed: float vectors do not compress)
    model      string                    (dictionary-encoded)

in row groups of `ROW_GROUP_ROWS` rows, so a reader holds one row group (or one batch) at a time.
On disk a vector costs 4·d bytes plus its id (≈ 2,048 + 20–40 bytes at d = 512). The file's
key-value metadata repeats the partition key, the model and d, so counts, dimensions and models
are answered from footers without reading a vector.

A partition is written to a temporary file in the same folder (`*.parquet.tmp-*`, never matched by
the `*.parquet` glob), fsynced and moved over the old file with `os.replace`: re-writing a
partition replaces it atomically and a crash mid-write leaves the old file.

Partition keys are escaped into file names: `[A-Za-z0-9_-]` stay, every other byte of the UTF-8
key becomes `%XX` (so `.` `/` `%` `~` and leading dots can never form a path or a hidden name);
an escaped name longer than `_MAX_NAME` is cut and suffixed with `~<sha1>`, the key then being read
back from the file's metadata.

This module knows nothing of Dagster or DuckDB; the table layer (`dedup_assets.tables`) exposes the
files to DuckDB as the view `embeddings`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 4096
SUFFIX = ".parquet"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_NAME = 180
_META_PARTITION = b"dedup_assets.partition"
_META_MODEL = b"dedup_assets.model"
_META_DIM = b"dedup_assets.dim"


class StoreError(RuntimeError):
    """An embedding-store operation that cannot proceed, with a message that says what to do."""


def escape_key(partition: str) -> str:
    """A safe file name (without suffix) for any non-empty partition key."""
    if not isinstance(partition, str) or partition == "":
        raise StoreError(f"a partition key must be a non-empty string, got {partition!r}")
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in partition.encode("utf-8"))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(partition.encode("utf-8")).hexdigest()
        name = f"{name[: _MAX_NAME - 42]}~{digest}"
    return name


def unescape_name(name: str) -> str | None:
    """The partition key of an escaped name, or None when the name was shortened (read the metadata)."""
    if "~" in name:
        return None
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%":
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(name[i]))
            i += 1
    return raw.decode("utf-8")


def _schema(d: int) -> pa.Schema:
    return pa.schema(
        [
            ("partition", pa.string()),
            ("image_id", pa.string()),
            ("row", pa.int32()),
            ("embedding", pa.list_(pa.float32(), d)),
            ("model", pa.string()),
        ]
    )


def _to_matrix(col: pa.ChunkedArray | pa.Array, n: int, d: int) -> np.ndarray:
    """A contiguous (n, d) float32 matrix from a fixed_size_list<float32>[d] column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    # the child values of this slice (10× faster than .flatten(); vectors are never null)
    flat = col.values.slice(col.offset * d, n * d).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(n, d))


class EmbeddingStore:
    """Vectors, one Parquet file per partition, written atomically and read in bounded batches."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_warehouse(cls, warehouse_path: str | Path) -> "EmbeddingStore":
        """The store of a warehouse file: `<stem>_files/embeddings/` next to it."""
        p = Path(warehouse_path)
        return cls(p.with_name(p.stem + "_files") / "embeddings")

    @property
    def glob(self) -> str:
        """The glob of every partition file (absolute), for readers such as DuckDB's read_parquet."""
        return str(self.root.resolve() / f"*{SUFFIX}")

    def path_of(self, partition: str) -> Path:
        return self.root / f"{escape_key(partition)}{SUFFIX}"

    # ---------------------------------------------------------------------------------- writes
    def write_partition(
        self, partition: str, ids: Sequence[str], vectors: np.ndarray, model: str
    ) -> int:
        """Write (or atomically replace) one partition's vectors, rows in the order given; returns n."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise StoreError(f"partition {partition!r}: vectors must be (n, d) with d ≥ 1, got {vectors.shape}")
        return self.write_partition_batches(partition, [(ids, vectors)], model, dim=int(vectors.shape[1]))

    def write_partition_batches(
        self,
        partition: str,
        batches: Iterable[tuple[Sequence[str], np.ndarray]],
        model: str,
        dim: int,
    ) -> int:
        """Like `write_partition`, from an iterable of (ids, (b, dim) vectors) batches, holding one
        batch at a time: the way to write a partition bigger than memory. Returns rows written."""
        if dim < 1:
            raise StoreError(f"partition {partition!r}: dim must be ≥ 1, got {dim}")
        if not model:
            raise StoreError(f"partition {partition!r}: a model id is required")
        final = self.path_of(partition)  # validates the key before anything is written
        schema = _schema(dim).with_metadata(
            {_META_PARTITION: partition.encode("utf-8"), _META_MODEL: model.encode("utf-8"),
             _META_DIM: str(dim).encode()}
        )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        n = 0
        try:
            with open(tmp, "wb") as fh:
                with pq.ParquetWriter(
                    fh,
                    schema,
                    compression={"partition": "zstd", "image_id": "zstd", "row": "zstd",
                                 "embedding": "none", "model": "zstd"},
                    use_dictionary=["partition", "model"],
                ) as writer:
                    for ids, vectors in batches:
                        table = self._batch_table(partition, list(ids), vectors, model, dim, n, schema)
                        if table.num_rows or n == 0:
                            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                        n += table.num_rows
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return n

    @staticmethod
    def _batch_table(
        partition: str, ids: list[str], vectors: np.ndarray, model: str, dim: int, first_row: int,
        schema: pa.Schema,
    ) -> pa.Table:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise StoreError(f"partition {partition!r}: vectors must be (n, {dim}), got {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise StoreError(f"partition {partition!r}: vectors must be floating point, got {vectors.dtype}")
        b = int(vectors.shape[0])
        if len(ids) != b:
            raise StoreError(f"partition {partition!r}: {len(ids)} ids for {b} vectors")
        mat = np.ascontiguousarray(vectors, dtype=np.float32)
        finite = np.isfinite(mat).all(axis=1)
        if not finite.all():
            bad = (np.flatnonzero(~finite)[:5] + first_row).tolist()
            raise StoreError(
                f"partition {partition!r}: {int((~finite).sum())} vectors hold NaN/Inf (rows {bad}…); "
                f"filter them out before writing"
            )
        return pa.table(
            {
                "partition": pa.array([partition] * b, pa.string()),
                "image_id": pa.array(ids, pa.string()),
                "row": pa.array(np.arange(first_row, first_row + b, dtype=np.int32)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), dim),
                "model": pa.array([model] * b, pa.string()),
            },
            schema=schema,
        )

    def delete_partition(self, partition: str) -> None:
        """Remove one partition's file (no error when it is absent)."""
        self.path_of(partition).unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------- reads
    def _files(self) -> dict[str, Path]:
        if not self.root.is_dir():
            return {}
        out: dict[str, Path] = {}
        for p in self.root.iterdir():
            if not p.name.endswith(SUFFIX) or not p.is_file():
                continue
            key = unescape_name(p.name[: -len(SUFFIX)])
            if key is None:
                key = _meta(p)[_META_PARTITION].decode("utf-8")
            out[key] = p
        return out

    def _file(self, partition: str) -> Path:
        p = self.path_of(partition)
        if not p.is_file():
            raise StoreError(f"the embedding store {self.root} has no partition {partition!r}")
        return p

    def _selected(self, partitions: Sequence[str] | None) -> list[tuple[str, Path]]:
        files = self._files()
        if partitions is None:
            return sorted(files.items())
        return [(k, self._file(k)) for k in partitions]

    def partitions(self) -> list[str]:
        """Sorted partition keys present."""
        return sorted(self._files())

    def count(self, partitions: Sequence[str] | None = None) -> int:
        """Number of vectors (from file footers; no vector is read)."""
        return sum(pq.ParquetFile(p).metadata.num_rows for _, p in self._selected(partitions))

    def counts(self, partitions: Sequence[str] | None = None) -> dict[str, int]:
        """Vectors per partition (from file footers)."""
        return {k: pq.ParquetFile(p).metadata.num_rows for k, p in self._selected(partitions)}

    def dim(self) -> int | None:
        """The vector dimension (None when the store is empty)."""
        dims = {int(_meta(p)[_META_DIM]) for _, p in self._selected(None)}
        if len(dims) > 1:
            raise StoreError(f"the embedding store {self.root} mixes dimensions {sorted(dims)}")
        return dims.pop() if dims else None

    def models(self) -> set[str]:
        """The model ids of the stored vectors (from file footers)."""
        return set(self.partition_models().values())

    def partition_models(self) -> dict[str, str]:
        """Model id per partition (from file footers)."""
        return {k: _meta(p)[_META_MODEL].decode("utf-8") for k, p in self._selected(None)}

    def read_partition(self, partition: str) -> tuple[list[str], np.ndarray]:
        """Ids and the (n, d) float32 matrix of one partition, in row order."""
        path = self._file(partition)
        d = int(_meta(path)[_META_DIM])
        tbl = pq.read_table(path, columns=["image_id", "embedding"])
        return tbl.column("image_id").to_pylist(), _to_matrix(tbl.column("embedding"), tbl.num_rows, d)

    def iter_batches(
        self, partitions: Sequence[str] | None = None, batch_rows: int = 65536
    ) -> Iterator[tuple[str, list[str], np.ndarray]]:
        """(partition, ids, float32 matrix) in partition order then row order, ≤ batch_rows per batch."""
        if batch_rows < 1:
            raise StoreError(f"batch_rows must be ≥ 1, got {batch_rows}")
        for key, path in self._selected(partitions):
            d = int(_meta(path)[_META_DIM])
            with pq.ParquetFile(path) as pf:  # closed (and its buffers freed) before the next partition
                for batch in pf.iter_batches(batch_size=batch_rows, columns=["image_id", "embedding"]):
                    if batch.num_rows == 0:
                        continue
                    yield key, batch.column(0).to_pylist(), _to_matrix(batch.column(1), batch.num_rows, d)
                    del batch
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise

    def read_rows(self, partition: str, rows: np.ndarray) -> np.ndarray:
        """Float32 vectors of the given row positions of one partition, in the order given.

        Reads only the row groups that hold a requested row.
        """
        return self._rows(partition, rows, with_ids=False)[1]

    def _rows(self, partition: str, rows: np.ndarray, with_ids: bool) -> tuple[list[str], np.ndarray]:
        path = self._file(partition)
        d = int(_meta(path)[_META_DIM])
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise StoreError(f"partition {partition!r} has {n} rows; asked for rows outside 0..{n - 1}")
        out = np.empty((rows.size, d), dtype=np.float32)
        ids: list[str] = [""] * rows.size if with_ids else []
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        columns = ["image_id", "embedding"] if with_ids else ["embedding"]
        for g in np.unique(groups):
            sel = np.flatnonzero(groups == g)
            tbl = pf.read_row_group(int(g), columns=columns)
            local = rows[sel] - starts[g]
            out[sel] = _to_matrix(tbl.column("embedding"), tbl.num_rows, d)[local]
            if with_ids:
                for i, v in zip(sel.tolist(), tbl.column("image_id").take(pa.array(local)).to_pylist()):
                    ids[i] = v
        return ids, out

    def sample(
        self, n: int, seed: int, partitions: Sequence[str] | None = None
    ) -> tuple[list[str], np.ndarray]:
        """A uniform random sample of min(n, count) rows without replacement, deterministic for a seed.

        Row positions are drawn over the concatenation of the partitions (Floyd's algorithm inside
        numpy's `choice`, memory O(n)), then read partition by partition at row-group granularity.
        Result order: partition order, then row order.
        """
        selected = self._selected(partitions)
        counts = [pq.ParquetFile(p).metadata.num_rows for _, p in selected]
        total = int(sum(counts))
        m = min(int(n), total)
        if m <= 0:
            d = self.dim() or 0
            return [], np.zeros((0, d), dtype=np.float32)
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(total, size=m, replace=False))
        offsets = np.cumsum([0] + counts)
        ids: list[str] = []
        mats: list[np.ndarray] = []
        for i, (key, _) in enumerate(selected):
            lo, hi = np.searchsorted(picks, [offsets[i], offsets[i + 1]])
            if lo == hi:
                continue
            part_ids, mat = self._rows(key, picks[lo:hi] - offsets[i], with_ids=True)
            ids.extend(part_ids)
            mats.append(mat)
        return ids, np.concatenate(mats, axis=0)


def _meta(path: Path) -> dict[bytes, bytes]:
    md = pq.read_schema(path).metadata or {}
    if _META_DIM not in md or _META_MODEL not in md or _META_PARTITION not in md:
        raise StoreError(f"{path} is not a file of this embedding store (its metadata lacks the partition/model/dim keys)")
    return md


def _fsync_dir(path: Path) -> None:
    # make the rename itself durable; some filesystems refuse fsync on a directory
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
