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
- `skipped_entries` (one row per entry that gives no index row; shard '' = the dataset root):
  `SKIPPED_SCHEMA`, written per shard with the index.
- `shard_state` (one row per shard: the CLI's resume record): `SHARD_STATE_SCHEMA`.
- The near-copy threshold τ: `resolve_threshold`, used by dedup and the audit.

No Dagster here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import polars as pl

from dedup_assets.ingest.index import INDEX_SCHEMA, SKIPPED_SCHEMA
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
    "write_skipped_entries",
    "read_shard_state",
    "write_shard_state",
    "delete_shard_state",
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


# -------------------------------------------------------------------------------- skipped_entries
SKIPPED_ENTRIES = "skipped_entries"


def write_skipped_entries(wh: Warehouse, shard: str, df: pl.DataFrame) -> int:
    """Replace one shard's skipped entries (shard '' holds the entries directly under the root)."""
    if list(df.schema.items()) != list(SKIPPED_SCHEMA.items()):
        raise WarehouseError(f"skipped_entries frame has schema {dict(df.schema)}; expected {SKIPPED_SCHEMA}")
    return wh.replace_partition(SKIPPED_ENTRIES, df, "shard", shard)


# ------------------------------------------------------------------------------------ shard_state
SHARD_STATE = "shard_state"
SHARD_STATE_SCHEMA: dict[str, pl.DataType] = {
    "shard": pl.String,
    "fingerprint": pl.String,
    "config": pl.String,
    "run_id": pl.String,
    "finished_at": pl.String,
}


def read_shard_state(wh: Warehouse) -> pl.DataFrame:
    if not wh.table_exists(SHARD_STATE):
        return pl.DataFrame(schema=SHARD_STATE_SCHEMA)
    return wh.read_table(SHARD_STATE)


def write_shard_state(wh: Warehouse, row: dict[str, str]) -> int:
    return wh.replace_partition(SHARD_STATE, pl.DataFrame([row], schema=SHARD_STATE_SCHEMA), "shard", row["shard"])


def delete_shard_state(wh: Warehouse, shard: str) -> None:
    wh.delete_partition(SHARD_STATE, "shard", shard)


# ------------------------------------------------------------------------------------- embeddings
EMBEDDINGS = "embeddings"
EMBEDDINGS_COLUMNS = ("image_id", "shard", "embedding", "model")


def embedding_store(wh: Warehouse) -> EmbeddingStore:
    """The warehouse's embedding store: `<stem>_files/embeddings/`."""
    return EmbeddingStore.for_warehouse(wh.path)


def embeddings_kind(wh: Warehouse) -> str | None:
    """'VIEW' (the store), 'BASE TABLE' (a warehouse from before the store) or None (absent)."""
    return _view_state(wh).kind


def _glob_literal(store: EmbeddingStore) -> str:
    return "'" + store.glob.replace("'", "''") + "'"  # a path, quoted as a SQL string literal


def _view_sql(store: EmbeddingStore, d: int | None) -> str:
    if d is None:
        return (
            f"CREATE OR REPLACE VIEW {EMBEDDINGS} AS SELECT CAST(NULL AS VARCHAR) AS image_id, "
            "CAST(NULL AS VARCHAR) AS shard, CAST(NULL AS FLOAT[]) AS embedding, "
            "CAST(NULL AS VARCHAR) AS model WHERE false"
        )
    return (
        f"CREATE OR REPLACE VIEW {EMBEDDINGS} AS SELECT image_id, partition AS shard, "
        f"CAST(embedding AS FLOAT[{int(d)}]) AS embedding, model "
        f"FROM read_parquet({_glob_literal(store)})"
    )


@dataclass(frozen=True)
class _ViewState:
    kind: str | None  # 'VIEW', 'BASE TABLE' or None
    dim: int | None  # d of the view's FLOAT[d]; None for the empty view (FLOAT[]) or no view
    sql: str


def _view_state(wh: Warehouse) -> _ViewState:
    if not wh.path.exists():
        return _ViewState(None, None, "")
    with wh.connect() as con:
        kind = con.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'",
            [EMBEDDINGS],
        ).fetchall()
        if not kind:
            return _ViewState(None, None, "")
        dtype = con.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = ? AND table_schema = 'main' "
            "AND column_name = 'embedding'",
            [EMBEDDINGS],
        ).fetchall()
        sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ? AND schema_name = 'main'",
                          [EMBEDDINGS]).fetchall()
    m = re.fullmatch(r"FLOAT\[(\d+)\]", dtype[0][0]) if dtype else None
    return _ViewState(str(kind[0][0]), int(m.group(1)) if m else None, str(sql[0][0]) if sql else "")


def refresh_embeddings_view(wh: Warehouse, store: EmbeddingStore | None = None) -> None:
    """(Re)create the view `embeddings` over the store's files (an empty typed view when none).

    Reads every file's footer (to check they share one dimension); the writers below call it only
    when the view must change, not on every write.
    """
    store = store or embedding_store(wh)
    if _view_state(wh).kind == "BASE TABLE":
        raise WarehouseError(
            f"{wh.path} holds a table {EMBEDDINGS!r} from before the embedding store; "
            "call ensure_embeddings() to migrate it"
        )
    sql = _view_sql(store, store.dim())
    with wh.connect() as con:
        con.execute(sql)


def ensure_embeddings(wh: Warehouse, log: Callable[[str], None] | None = None) -> EmbeddingStore:
    """The store, with the view in place; migrates a legacy FLOAT[d] `embeddings` table first.

    Migration: per shard, the rows (ordered by image_id) are written to the store as that shard's
    partition; then, in one transaction, the table is dropped and the view created. Memory: one
    shard. A shard whose rows mix models is refused (the old table could not be trusted). The view
    is (re)created when it is missing or points at another folder (a moved warehouse).
    """
    store = embedding_store(wh)
    state = _view_state(wh)
    if state.kind == "BASE TABLE":
        _migrate(wh, store, log)
    elif state.kind is None or (state.dim is not None and _glob_literal(store) not in state.sql):
        refresh_embeddings_view(wh, store)
    return store


def _migrate(wh: Warehouse, store: EmbeddingStore, log: Callable[[str], None] | None) -> None:
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
    sql = _view_sql(store, store.dim())
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


def write_embeddings(
    wh: Warehouse,
    partition: str,
    batches: Iterable[tuple[Sequence[str], np.ndarray]],
    model: str,
    dim: int,
) -> int:
    """Write one partition's vectors to the store (atomic replace); the view sees the new file at
    once (it globs the folder) and is only recreated when its dimension changes (or it was empty).

    Refuses a dimension other than the one the other partitions hold."""
    store = ensure_embeddings(wh)
    view = _view_state(wh)
    if view.dim is not None and view.dim != dim:
        others = [p for p in store.partitions() if p != partition]
        if others:
            raise WarehouseError(
                f"partition {partition!r} has {dim}-d vectors but the store holds {view.dim}-d ones "
                f"(e.g. {others[:3]}): one model per warehouse; re-embed every partition with one model"
            )
    n = store.write_partition_batches(partition, batches, model, dim)
    if view.dim != dim:
        refresh_embeddings_view(wh, store)
    return n


def delete_embeddings(wh: Warehouse, partition: str) -> None:
    """Remove one partition's vectors; the view turns into the empty one when no file is left."""
    store = ensure_embeddings(wh)
    store.delete_partition(partition)
    if not store.partitions():
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
