"""The table layer: the one place that knows the warehouse's tables — names, schemas, the SQL
that reads and writes them, and where files live.

Why a module beside `warehouse.py` rather than inside it: `Warehouse` is the generic DuckDB access
(lock, transactions, partition replacement) and stays table-agnostic; this module is the catalogue
of *our* tables on top of it, plus the embedding store (`dedup_assets.store`) that holds vectors
outside DuckDB. Assets in `defs/` call these functions and never write SQL for these tables
themselves. To add a table: a `<TABLE>` name constant, its `<TABLE>_SCHEMA`, and typed
`write_<table>` / `read_<table>` functions next to the others.

Tables here so far:
- `image_index` (one row per file, or per metadata row of external embeddings): `INDEX_SCHEMA`.
- `embeddings`: a DuckDB **view** (image_id, shard, embedding FLOAT[d], model) over the store's
  Parquet files, one per partition. The view is refreshed after every store write: over the files'
  glob when there are any, else an empty typed view (so queries on an empty store return no rows
  instead of failing). A warehouse from before the store, holding a `FLOAT[d]` table `embeddings`,
  is migrated by `ensure_embeddings`: shard by shard into the store, then the table is dropped and
  the view created in one transaction (a crash before that leaves the table, and migration reruns).
- The near-copy threshold τ: `resolve_threshold`, used by dedup and the audit.

No Dagster here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import polars as pl

from dedup_assets.ingest.index import INDEX_SCHEMA
from dedup_assets.store import EmbeddingStore
from dedup_assets.warehouse import Warehouse, WarehouseError

__all__ = [
    "EMBEDDINGS",
    "EMBEDDINGS_COLUMNS",
    "IMAGE_INDEX",
    "IMAGE_INDEX_SCHEMA",
    "ThresholdRequiredError",
    "delete_embeddings",
    "embedding_store",
    "embeddings_kind",
    "ensure_embeddings",
    "partition_models",
    "read_image_index",
    "refresh_embeddings_view",
    "resolve_threshold",
    "write_embeddings",
    "write_image_index",
]

# ------------------------------------------------------------------------------------ image_index
IMAGE_INDEX = "image_index"
IMAGE_INDEX_SCHEMA = INDEX_SCHEMA


def write_image_index(wh: Warehouse, shard: str, df: pl.DataFrame) -> int:
    """Replace one shard's rows of image_index (one transaction)."""
    if list(df.schema.items()) != list(IMAGE_INDEX_SCHEMA.items()):
        raise WarehouseError(
            f"image_index frame for {shard!r} has schema {dict(df.schema)}; expected {IMAGE_INDEX_SCHEMA}"
        )
    return wh.replace_partition(IMAGE_INDEX, df, "shard", shard)


def read_image_index(wh: Warehouse, shard: str, status: str | None = None) -> pl.DataFrame:
    """One shard's image_index rows (optionally only one status), ordered by image_id."""
    where, params = "shard = $shard", {"shard": shard}
    if status is not None:
        where, params = where + " AND status = $status", {**params, "status": status}
    return wh.read_table(IMAGE_INDEX, where=where, params=params, order_by="image_id")


# ------------------------------------------------------------------------------------- embeddings
EMBEDDINGS = "embeddings"
EMBEDDINGS_COLUMNS = ("image_id", "shard", "embedding", "model")


def embedding_store(wh: Warehouse) -> EmbeddingStore:
    """The warehouse's embedding store: `<stem>_files/embeddings/`."""
    return EmbeddingStore.for_warehouse(wh.path)


def embeddings_kind(wh: Warehouse) -> str | None:
    """'VIEW' (the store), 'BASE TABLE' (a warehouse from before the store) or None (absent)."""
    if not wh.path.exists():
        return None
    rows = wh.query(
        "SELECT table_type FROM information_schema.tables WHERE table_name = $t AND table_schema = 'main'",
        {"t": EMBEDDINGS},
    )
    return str(rows["table_type"][0]) if rows.height else None


def _view_sql(store: EmbeddingStore) -> str:
    d = store.dim()
    if d is None:
        return (
            f"CREATE OR REPLACE VIEW {EMBEDDINGS} AS SELECT CAST(NULL AS VARCHAR) AS image_id, "
            "CAST(NULL AS VARCHAR) AS shard, CAST(NULL AS FLOAT[]) AS embedding, "
            "CAST(NULL AS VARCHAR) AS model WHERE false"
        )
    glob = store.glob.replace("'", "''")  # a path, quoted as a SQL string literal
    return (
        f"CREATE OR REPLACE VIEW {EMBEDDINGS} AS SELECT image_id, partition AS shard, "
        f"CAST(embedding AS FLOAT[{int(d)}]) AS embedding, model "
        f"FROM read_parquet('{glob}')"
    )


def refresh_embeddings_view(wh: Warehouse, store: EmbeddingStore | None = None) -> None:
    """(Re)create the view `embeddings` over the store's files (an empty typed view when none)."""
    store = store or embedding_store(wh)
    sql = _view_sql(store)
    with wh.connect() as con:
        kind = con.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'",
            [EMBEDDINGS],
        ).fetchall()
        if kind and kind[0][0] != "VIEW":
            raise WarehouseError(
                f"{wh.path} holds a table {EMBEDDINGS!r} from before the embedding store; "
                "call ensure_embeddings() to migrate it"
            )
        con.execute(sql)


def ensure_embeddings(wh: Warehouse, log: Callable[[str], None] | None = None) -> EmbeddingStore:
    """The store, with the view in place; migrates a legacy FLOAT[d] `embeddings` table first.

    Migration: per shard, the rows (ordered by image_id) are written to the store as that shard's
    partition; then, in one transaction, the table is dropped and the view created. Memory: one
    shard. A shard whose rows mix models is refused (the old table could not be trusted).
    """
    store = embedding_store(wh)
    kind = embeddings_kind(wh)
    if kind == "BASE TABLE":
        shards = wh.query(f"SELECT shard, count(*) AS n, count(DISTINCT model) AS models FROM {EMBEDDINGS} "
                          "GROUP BY shard ORDER BY shard")
        mixed = shards.filter(pl.col("models") > 1)
        if mixed.height:
            raise WarehouseError(
                f"cannot migrate {wh.path}: the embeddings of shard(s) {mixed['shard'].to_list()[:5]} "
                f"mix models; re-embed them (DROP TABLE embeddings, then re-materialize `embeddings`)"
            )
        total = 0
        for shard, n in shards.select("shard", "n").iter_rows():
            ids, x = wh.read_vectors(EMBEDDINGS, "image_id", "embedding", where="shard = $s", params={"s": shard})
            model = str(wh.query(f"SELECT any_value(model) AS m FROM {EMBEDDINGS} WHERE shard = $s",
                                 {"s": shard})["m"][0])
            store.write_partition(shard, ids, x, model)
            total += int(n)
            if log:
                log(f"migrated {n} vectors of shard {shard} into {store.path_of(shard)}")
        sql = _view_sql(store)
        with wh.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"DROP TABLE {EMBEDDINGS}")
                con.execute(sql)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        if log:
            log(f"migrated the embeddings table ({total} vectors, {shards.height} shards) to the store "
                f"{store.root}; `embeddings` is now a view over it")
    elif kind is None or kind == "VIEW":
        refresh_embeddings_view(wh, store)
    return store


def write_embeddings(
    wh: Warehouse,
    partition: str,
    batches: Iterable[tuple[Sequence[str], np.ndarray]],
    model: str,
    dim: int,
) -> int:
    """Write one partition's vectors to the store (atomic replace), then refresh the view."""
    store = ensure_embeddings(wh)
    n = store.write_partition_batches(partition, batches, model, dim)
    refresh_embeddings_view(wh, store)
    return n


def delete_embeddings(wh: Warehouse, partition: str) -> None:
    store = ensure_embeddings(wh)
    store.delete_partition(partition)
    refresh_embeddings_view(wh, store)


def partition_models(wh: Warehouse) -> dict[str, str]:
    """Model id per stored partition (from file footers: no vector is read)."""
    return ensure_embeddings(wh).partition_models()


# ------------------------------------------------------------------------------------ threshold τ
class ThresholdRequiredError(ValueError):
    """No near-copy threshold can be resolved (external vectors come without a calibration)."""


class ThresholdSource(Protocol):
    """What the resolver needs from an embedder configuration (EmbedderResource satisfies it)."""

    @property
    def threshold(self) -> float | None: ...

    def calibrated_threshold(self) -> float | None: ...


def resolve_threshold(override: float | None, embedder: ThresholdSource) -> float:
    """The near-copy cosine τ, in this order: a per-asset override (DedupResource.threshold,
    CurateResource.audit_threshold), the run's `--threshold` (the embedder resource's `threshold`,
    for any embedder), the embedder's calibrated value; external vectors have none, so without
    one of the first two this raises saying to pass --threshold."""
    for value, what in ((override, "the asset's threshold"), (embedder.threshold, "--threshold")):
        if value is not None:
            if not -1.0 <= float(value) <= 1.0:
                raise ValueError(f"{what} is a cosine similarity in [-1, 1]; got {value}")
            return float(value)
    calibrated = embedder.calibrated_threshold()
    if calibrated is None:
        raise ThresholdRequiredError(
            "external embeddings have no calibrated near-copy threshold: pass --threshold T "
            "(the cosine at/above which two images are near-copies for your model, e.g. 0.95 for "
            "CLIP ViT-B/32), or set the embedder resource's `threshold`"
        )
    return float(calibrated)
