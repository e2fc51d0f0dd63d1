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

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import polars as pl

from dedup_assets.ingest.index import INDEX_SCHEMA, SKIPPED_SCHEMA
from dedup_assets.store import EmbeddingStore, escape_key, unescape_name
from dedup_assets.warehouse import Warehouse, WarehouseError, table_columns, table_exists, transaction

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


def _sql_str(value: object) -> str:
    """A path or name quoted as a SQL string literal (for table functions that take no parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def _glob_literal(store: EmbeddingStore) -> str:
    return _sql_str(store.glob)


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
        with transaction(con):
            con.execute(f"DROP TABLE {EMBEDDINGS}")
            con.execute(sql)
    if log:
        log(f"migrated the embeddings table ({total} vectors, {shards.height} shards) to the store "
            f"{store.root}; `embeddings` is now a view over it")


CLIP_SCORES = "clip_scores"
CLIP_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String, "shard": pl.String, "clip_score": pl.Float32, "model": pl.String,
}


def delete_clip_scores(wh: Warehouse, shard: str) -> None:
    """Drop one shard's clip scores (its vectors were rewritten or deleted: old scores must not stay)."""
    if wh.table_exists(CLIP_SCORES):
        wh.delete_partition(CLIP_SCORES, "shard", shard)


def write_clip_scores(wh: Warehouse, shard: str, df: pl.DataFrame) -> int:
    """Replace one shard's image–caption cosines (CLIP score), one transaction."""
    return wh.replace_partition(CLIP_SCORES, df.select(list(CLIP_SCORES_SCHEMA)).cast(CLIP_SCORES_SCHEMA), "shard", shard)


CAPTION_HYPERNYMS = "caption_hypernyms"
LABELS = "labels"
LABELS_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String, "label_set": pl.String, "label": pl.Boolean, "source": pl.String,
    "labelled_at": pl.Datetime("us"),
}
CLASSIFIER_SCORES = "classifier_scores"
LABEL_QUEUE = "label_queue"


def write_labels(wh: Warehouse, df: pl.DataFrame) -> int:
    """Add labels (LABELS_SCHEMA rows); a later label of the same (image_id, label_set) replaces the
    earlier one. Returns the rows written."""
    df = df.select(list(LABELS_SCHEMA)).cast(LABELS_SCHEMA).unique(["image_id", "label_set"], keep="last")
    with wh.connect() as con:
        con.execute(f"CREATE TABLE IF NOT EXISTS {LABELS} (image_id VARCHAR, label_set VARCHAR, label BOOLEAN, "
                    "source VARCHAR, labelled_at TIMESTAMP)")
        con.register("__labels", df)
        try:
            with transaction(con):
                con.execute(f"DELETE FROM {LABELS} l USING __labels n WHERE l.image_id = n.image_id "
                            "AND l.label_set = n.label_set")
                con.execute(f"INSERT INTO {LABELS} SELECT * FROM __labels")
        finally:
            con.unregister("__labels")
    return df.height


def read_labels(wh: Warehouse, label_set: str | None = None) -> pl.DataFrame:
    """Every label (of one label set when given), ordered by set and image."""
    if not wh.table_exists(LABELS):
        return pl.DataFrame(schema=LABELS_SCHEMA)
    if label_set is None:
        return wh.query(f"SELECT * FROM {LABELS} ORDER BY label_set, image_id")
    return wh.query(f"SELECT * FROM {LABELS} WHERE label_set = $s ORDER BY image_id", {"s": label_set})


def label_set_names(wh: Warehouse) -> list[str]:
    """The label sets that have labels, sorted."""
    if not wh.table_exists(LABELS):
        return []
    return [str(r) for r in wh.query(f"SELECT DISTINCT label_set FROM {LABELS} ORDER BY 1")["label_set"].to_list()]


def replace_caption_hypernyms(wh: Warehouse, shard: str, df: pl.DataFrame | None) -> None:
    """One shard's rows of caption_hypernyms := `df` (image_id, shard, caption_hypernymized,
    replacements); None deletes them (hypernymization off), so no stale caption outlives its shard."""
    if df is not None:
        wh.replace_partition(CAPTION_HYPERNYMS, df, "shard", shard)
    elif wh.table_exists(CAPTION_HYPERNYMS):
        with wh.connect() as con:
            con.execute(f"DELETE FROM {CAPTION_HYPERNYMS} WHERE shard = ?", [shard])


def unscored_by_label_set(wh: Warehouse) -> dict[str, int]:
    """Per label set with labels and scores: embedded images its classifier has not scored (vectors
    that arrived after the set's last materialization); sets with none are left out."""
    with wh.connect() as con:
        if not (table_exists(con, CLASSIFIER_SCORES) and table_exists(con, LABELS) and table_exists(con, EMBEDDINGS)):
            return {}
        rows = con.execute(
            f"WITH sets AS (SELECT DISTINCT label_set FROM {CLASSIFIER_SCORES} "
            f"WHERE label_set IN (SELECT label_set FROM {LABELS})) "
            f"SELECT s.label_set, count(*) FROM sets s CROSS JOIN (SELECT DISTINCT image_id FROM {EMBEDDINGS}) e "
            f"ANTI JOIN {CLASSIFIER_SCORES} c ON c.label_set = s.label_set AND c.image_id = e.image_id "
            "GROUP BY 1 ORDER BY 1").fetchall()
    return {str(k): int(v) for k, v in rows if v}


def label_set_versions(wh: Warehouse) -> list[tuple[str, int, str]]:
    """(label set, labels, latest labelled_at) per set: what the label sensor compares between ticks."""
    if not wh.table_exists(LABELS):
        return []
    rows = wh.query(f"SELECT label_set, count(*) AS n, CAST(max(labelled_at) AS VARCHAR) AS last FROM {LABELS} "
                    "GROUP BY 1 ORDER BY 1")
    return [(str(a), int(b), str(c)) for a, b, c in rows.iter_rows()]


CLASSIFIER_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String, "label_set": pl.String, "score": pl.Float64, "probability": pl.Float64,
    "remove": pl.Boolean,
}
LABEL_QUEUE_SCHEMA: dict[str, pl.DataType] = {
    "label_set": pl.String, "rank": pl.Int32, "image_id": pl.String, "score": pl.Float64,
}


def replace_classifier_scores(wh: Warehouse, label_set: str, files: Sequence[Path], queue: pl.DataFrame) -> int:
    """One label set's rows of classifier_scores := the Parquet parts (CLASSIFIER_SCORES_SCHEMA) and
    its rows of label_queue := `queue`, in one transaction (no parts: the set has no classifier and
    removes nothing). A human label overrides the classifier's decision. Returns images removed."""
    cols = ", ".join(CLASSIFIER_SCORES_SCHEMA)
    with wh.connect() as con:
        con.execute(f"CREATE TABLE IF NOT EXISTS {CLASSIFIER_SCORES} (image_id VARCHAR, label_set VARCHAR, "
                    "score DOUBLE, probability DOUBLE, remove BOOLEAN)")
        if "probability" not in table_columns(con, CLASSIFIER_SCORES):  # written before calibration
            con.execute(f"CREATE OR REPLACE TABLE {CLASSIFIER_SCORES} AS SELECT image_id, label_set, score, "
                        f"CAST(NULL AS DOUBLE) AS probability, remove FROM {CLASSIFIER_SCORES}")
        con.execute(f"CREATE TABLE IF NOT EXISTS {LABEL_QUEUE} (label_set VARCHAR, rank INTEGER, image_id VARCHAR, "
                    "score DOUBLE)")
        queue = queue.select(list(LABEL_QUEUE_SCHEMA)).cast(LABEL_QUEUE_SCHEMA)
        con.register("__queue", queue)
        try:
            with transaction(con):
                con.execute(f"DELETE FROM {CLASSIFIER_SCORES} WHERE label_set = ?", [label_set])
                if files:
                    lit = "[" + ", ".join(_sql_str(Path(f).resolve()) for f in files) + "]"
                    con.execute(f"INSERT INTO {CLASSIFIER_SCORES} ({cols}) SELECT {cols} FROM read_parquet({lit})")
                if table_exists(con, LABELS):
                    con.execute(f"UPDATE {CLASSIFIER_SCORES} c SET remove = l.label FROM {LABELS} l "
                                "WHERE l.image_id = c.image_id AND l.label_set = c.label_set AND c.label_set = ?",
                                [label_set])
                con.execute(f"DELETE FROM {LABEL_QUEUE} WHERE label_set = ?", [label_set])
                qcols = ", ".join(LABEL_QUEUE_SCHEMA)
                con.execute(f"INSERT INTO {LABEL_QUEUE} ({qcols}) SELECT {qcols} FROM __queue")
        finally:
            con.unregister("__queue")
        (removed,) = con.execute(f"SELECT count(*) FROM {CLASSIFIER_SCORES} WHERE remove AND label_set = ?",
                                 [label_set]).fetchone()
    return int(removed)


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


def search_threshold(tau: float, verifying: bool, margin: float) -> float:
    """The cosine at which candidate pairs are searched: τ itself, or τ − margin when a verification
    stage confirms candidates (it recovers copies the vectors place just below τ)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"verify_margin must be in [0, 1), got {margin}")
    return max(-1.0, float(tau) - float(margin)) if verifying else float(tau)


# ------------------------------------------------------------------------------- the corpus stage
# Tables (DuckDB):
#   clustering_centroids  one row per (clustering, cluster) of the current fit: CENTROIDS_SCHEMA
#   clusterings           one row per (image, clustering): CLUSTERINGS_SCHEMA, written per partition
#   clustering_partitions one row per partition assigned under the current fit: its store stamp
#   candidate_pairs       one row per pair image_a < image_b with cosine ≥ the search τ: PAIRS_SCHEMA
#   verified_pairs        one row per candidate pair with its verification verdict and whether it is
#                         a duplicate edge: VERIFIED_SCHEMA (dedup.verify)
#   duplicate_groups      one row per image of a group of two or more, built on the duplicate edges
#                         of verified_pairs: GROUP_SCHEMA (dedup.groups)
# Files (`<warehouse stem>_files/dedup/<fit_id>/`):
#   bucket_<b>/<partition>.<batch>.npy          float32 (m, d): the distinct vectors routed to b
#   bucket_<b>/<partition>.<batch>.ids.parquet  image_id of each of those m vectors
#   bucket_<b>/<partition>.<batch>.entries.parquet  vec, clustering, cluster, cluster2 (one row per
#       (vector, clustering) whose cluster or second cluster lies in b; -1 = in another bucket);
#       written last, so its presence marks a complete batch
#   pairs/bucket_<b>.parquet + .json            the pairs found in b (PAIRS_SCHEMA + shard_a,
#       shard_b) and what they were computed from (fit, τ, the batches' stamps), for incremental runs
# and `<warehouse stem>_files/verify/chunk_<c>.parquet`: one verification step's verdicts (VERIFIED_SCHEMA).
CLUSTERING_CENTROIDS = "clustering_centroids"
CLUSTERINGS = "clusterings"
CLUSTERING_PARTITIONS = "clustering_partitions"
CANDIDATE_PAIRS = "candidate_pairs"
VERIFIED_PAIRS = "verified_pairs"
DUPLICATE_GROUPS = "duplicate_groups"

CLUSTERINGS_SCHEMA = {
    "image_id": pl.String, "shard": pl.String, "clustering": pl.Int32, "cluster": pl.Int32, "cluster2": pl.Int32,
}
CLUSTERING_PARTITIONS_SCHEMA = {"partition": pl.String, "fit_id": pl.String, "rows": pl.Int64, "stamp": pl.String}
PAIRS_SCHEMA = {"image_a": pl.String, "image_b": pl.String, "similarity": pl.Float32, "found_by": pl.UInt8}
BUCKET_PAIRS_SCHEMA = {**PAIRS_SCHEMA, "shard_a": pl.String, "shard_b": pl.String, "h": pl.UInt16}  # h: hash class of image_a
VERIFIED_SCHEMA = {
    **PAIRS_SCHEMA,
    "is_duplicate": pl.Boolean,  # an edge of duplicate_groups
    "verdict": pl.String,  # accepted | undecided:<reason> | rejected:<reason> | not_verified
    "inliers": pl.Int32, "overlap": pl.Float32, "changed": pl.Float32, "mirrored": pl.Boolean,
    # the agreeing matches (x, y interleaved, as fractions of each image's width and height; ≤ 48 points)
    "points_a": pl.List(pl.Float32), "points_b": pl.List(pl.Float32),
}


@dataclass(frozen=True)
class Fit:
    """The stored clustering fit: centroids per clustering and the bucket of every cluster."""

    fit_id: str
    model: str
    n_at_fit: int
    subset_size: int
    n_buckets: int
    soft: bool
    centroids: list[np.ndarray]
    buckets: list[np.ndarray]

    @property
    def n_clusterings(self) -> int:
        return len(self.centroids)

    @property
    def k(self) -> int:
        return int(self.centroids[0].shape[0]) if self.centroids else 0


def write_fit(wh: Warehouse, fit: Fit, loads: Sequence[np.ndarray]) -> None:
    d = int(fit.centroids[0].shape[1])
    frames = [
        pl.DataFrame(
            {
                "clustering": np.full(c.shape[0], i, np.int32),
                "cluster": np.arange(c.shape[0], dtype=np.int32),
                "centroid": c.astype(np.float32),
                "bucket": b.astype(np.int32),
                "load": np.asarray(load, dtype=np.float64),
            },
            schema={"clustering": pl.Int32, "cluster": pl.Int32, "centroid": pl.Array(pl.Float32, d),
                    "bucket": pl.Int32, "load": pl.Float64},
        )
        for i, (c, b, load) in enumerate(zip(fit.centroids, fit.buckets, loads))
    ]
    df = pl.concat(frames).with_columns(
        pl.lit(fit.model).alias("model"), pl.lit(fit.fit_id).alias("fit_id"),
        pl.lit(fit.n_at_fit, pl.Int64).alias("n_at_fit"), pl.lit(fit.subset_size, pl.Int64).alias("subset_size"),
        pl.lit(fit.n_buckets, pl.Int32).alias("n_buckets"), pl.lit(fit.soft).alias("soft"),
    )
    wh.replace_table(CLUSTERING_CENTROIDS, df)


def read_fit(wh: Warehouse) -> Fit | None:
    """The current fit, or None when there is none (or it predates buckets)."""
    if not wh.table_exists(CLUSTERING_CENTROIDS):
        return None
    with wh.connect() as con:
        cols = set(table_columns(con, CLUSTERING_CENTROIDS))
        if not {"bucket", "n_buckets", "soft"} <= cols:
            return None
        tbl = con.sql(f"SELECT * FROM {CLUSTERING_CENTROIDS} ORDER BY clustering, cluster").to_arrow_table()
    if tbl.num_rows == 0:
        return None
    clustering = tbl.column("clustering").to_numpy()
    col = tbl.column("centroid").combine_chunks()
    d = col.type.list_size
    cents = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    bucket = tbl.column("bucket").to_numpy()
    first = {name: tbl.column(name)[0].as_py() for name in ("fit_id", "model", "n_at_fit", "subset_size", "n_buckets", "soft")}
    ks = sorted(set(clustering.tolist()))
    return Fit(
        fit_id=str(first["fit_id"]), model=str(first["model"]), n_at_fit=int(first["n_at_fit"]),
        subset_size=int(first["subset_size"]), n_buckets=int(first["n_buckets"]), soft=bool(first["soft"]),
        centroids=[np.ascontiguousarray(cents[clustering == c]) for c in ks],
        buckets=[bucket[clustering == c].astype(np.int32) for c in ks],
    )


def read_assigned_partitions(wh: Warehouse, fit_id: str) -> dict[str, str]:
    """partition → stamp of the partitions assigned under `fit_id`."""
    if not wh.table_exists(CLUSTERING_PARTITIONS):
        return {}
    df = wh.query(f"SELECT partition, stamp FROM {CLUSTERING_PARTITIONS} WHERE fit_id = $f", {"f": fit_id})
    return dict(zip(df["partition"].to_list(), df["stamp"].to_list()))


def record_assigned_partition(wh: Warehouse, partition: str, fit_id: str, rows: int, stamp: str) -> None:
    df = pl.DataFrame({"partition": [partition], "fit_id": [fit_id], "rows": [rows], "stamp": [stamp]},
                      schema=CLUSTERING_PARTITIONS_SCHEMA)
    wh.replace_partition(CLUSTERING_PARTITIONS, df, "partition", partition)


def forget_assignments(wh: Warehouse, partition: str | None = None) -> None:
    """Drop the clusterings rows and assignment records of one partition (None = all)."""
    with wh.connect() as con:
        for table, col in ((CLUSTERINGS, "shard"), (CLUSTERING_PARTITIONS, "partition")):
            if table_exists(con, table):
                if partition is None:
                    con.execute(f"DELETE FROM {table}")
                else:
                    con.execute(f"DELETE FROM {table} WHERE {col} = ?", [partition])


def write_clusterings(wh: Warehouse, partition: str, df: pl.DataFrame) -> int:
    if wh.table_exists(CLUSTERINGS):
        with wh.connect() as con:
            if table_columns(con, CLUSTERINGS) != list(CLUSTERINGS_SCHEMA):  # a table from before the streamed corpus stage
                con.execute(f"DROP TABLE {CLUSTERINGS}")
    return wh.replace_partition(CLUSTERINGS, df.select(list(CLUSTERINGS_SCHEMA)), "shard", partition)


class CorpusFiles:
    """The files of the corpus stage under `<warehouse stem>_files/dedup/` (layout above)."""

    def __init__(self, wh: Warehouse) -> None:
        self.root = wh.path.with_name(wh.path.stem + "_files") / "dedup"

    def fit_dir(self, fit_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{6,64}", fit_id):
            raise ValueError(f"not a fit id: {fit_id!r}")
        return self.root / fit_id

    def bucket_dir(self, fit_id: str, bucket: int) -> Path:
        return self.fit_dir(fit_id) / f"bucket_{int(bucket):04d}"

    def drop_other_fits(self, fit_id: str) -> None:
        import shutil

        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name != fit_id and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)

    # spill ---------------------------------------------------------------------------------
    def write_batch(
        self, fit_id: str, bucket: int, partition: str, batch: int,
        ids: Sequence[str], vectors: np.ndarray, entries: dict[str, np.ndarray],
    ) -> int:
        """Write one batch's share of a bucket atomically (entries file last); returns bytes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        d = self.bucket_dir(fit_id, bucket)
        d.mkdir(parents=True, exist_ok=True)
        stem = f"{escape_key(partition)}.{int(batch):05d}"
        tmp = f".tmp-{uuid.uuid4().hex[:8]}"
        vec_path, ids_path, ent_path = d / f"{stem}.npy", d / f"{stem}.ids.parquet", d / f"{stem}.entries.parquet"
        np.save(str(vec_path) + tmp + ".npy", np.ascontiguousarray(vectors, dtype=np.float32))
        os.replace(str(vec_path) + tmp + ".npy", vec_path)
        pq.write_table(
            pa.table({"image_id": pa.array(list(ids), pa.string()),
                      "partition": pa.array([partition] * len(ids), pa.string()).dictionary_encode()}),
            str(ids_path) + tmp,
        )
        os.replace(str(ids_path) + tmp, ids_path)
        pq.write_table(
            pa.table({
                "vec": pa.array(entries["vec"].astype(np.int32)),
                "clustering": pa.array(entries["clustering"].astype(np.int8)),
                "cluster": pa.array(entries["cluster"].astype(np.int32)),
                "cluster2": pa.array(entries["cluster2"].astype(np.int32)),
            }),
            str(ent_path) + tmp,
        )
        os.replace(str(ent_path) + tmp, ent_path)
        return sum(p.stat().st_size for p in (vec_path, ids_path, ent_path))

    def delete_partition(self, fit_id: str, partition: str) -> None:
        """Remove a partition's batches from every bucket of the fit."""
        fd = self.fit_dir(fit_id)
        if not fd.is_dir():
            return
        prefix = escape_key(partition) + "."
        for b in fd.glob("bucket_*"):
            for p in b.iterdir():
                if p.name.startswith(prefix) and p.name[len(prefix):len(prefix) + 5].isdigit():
                    p.unlink(missing_ok=True)

    def batches(self, fit_id: str, bucket: int) -> list[tuple[str, Path]]:
        """(partition, path stem) of the complete batches of a bucket, sorted."""
        import pyarrow.parquet as pq

        d = self.bucket_dir(fit_id, bucket)
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.glob("*.entries.parquet")):
            stem = p.name[: -len(".entries.parquet")]
            key = unescape_name(stem.rsplit(".", 1)[0])
            if key is None:  # a shortened name: the key is in the ids file
                col = pq.read_table(d / f"{stem}.ids.parquet", columns=["partition"]).column(0)
                key = str(col[0].as_py()) if len(col) else stem
            out.append((key, d / stem))
        return out

    def spill_bytes(self, fit_id: str) -> int:
        fd = self.fit_dir(fit_id)
        return sum(p.stat().st_size for p in fd.rglob("*") if p.is_file()) if fd.is_dir() else 0

    def read_bucket(self, fit_id: str, bucket: int, d: int):  # noqa: ANN201 - BucketData
        """The bucket's vectors (memory-mapped), ids, partition of each vector and its entries."""
        import pyarrow.parquet as pq

        from dedup_assets.dedup.buckets import VectorFiles

        batches = self.batches(fit_id, bucket)
        ids: list[str] = []
        part_of: list[np.ndarray] = []
        parts: list[str] = []
        ent = {k: [] for k in ("vec", "clustering", "cluster", "cluster2")}
        offset = 0
        stamps: dict[str, str] = {}
        for n, (key, stem) in enumerate(batches):
            batch_ids = pq.read_table(f"{stem}.ids.parquet").column("image_id").to_pylist()
            e = pq.read_table(f"{stem}.entries.parquet")
            ids.extend(batch_ids)
            if not parts or parts[-1] != key:
                parts.append(key)
            part_of.append(np.full(len(batch_ids), len(parts) - 1, np.int32))
            ent["vec"].append(e.column("vec").to_numpy().astype(np.int64) + offset)
            for k in ("clustering", "cluster", "cluster2"):
                ent[k].append(e.column(k).to_numpy())
            offset += len(batch_ids)
            st = Path(f"{stem}.npy").stat()
            stamps[stem.name] = f"{st.st_size}:{st.st_mtime_ns}"
        vectors = VectorFiles([Path(f"{stem}.npy") for _, stem in batches], d)
        if len(vectors) != len(ids):
            raise WarehouseError(f"bucket {bucket} of fit {fit_id}: {len(vectors)} vectors but {len(ids)} ids")
        cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in ent.items()}
        return BucketData(
            vectors=vectors, ids=ids, partitions=parts,
            partition_of=np.concatenate(part_of) if part_of else np.zeros(0, np.int32),
            entries=cat, stamps=stamps,
        )

    # bucket pairs ---------------------------------------------------------------------------
    def pairs_path(self, fit_id: str, bucket: int) -> Path:
        return self.fit_dir(fit_id) / "pairs" / f"bucket_{int(bucket):04d}.parquet"

    def read_pairs_manifest(self, fit_id: str, bucket: int) -> dict | None:
        p = self.pairs_path(fit_id, bucket).with_suffix(".json")
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def pair_spill(self, fit_id: str, bucket: int, rows_per_part: int = 1 << 21) -> "PairSpill":
        """A spill of one bucket's pair chunks to files, merged into its pair file by `PairSpill.finish`."""
        return PairSpill(self, fit_id, bucket, rows_per_part)

    def pair_files(self, fit_id: str, n_buckets: int) -> list[Path]:
        return [p for b in range(n_buckets) if (p := self.pairs_path(fit_id, b)).exists()]


class PairSpill:
    """One bucket's pairs on their way to `pairs/bucket_NNNN.parquet` without being held at once.

    `add(vi, vj, sim, found_by)` buffers chunks of bucket-local vector indices and writes a Parquet
    part (int32, int32, float32, uint8: 13 bytes a row) whenever `rows_per_part` rows are buffered.
    `finish` unions the parts in DuckDB (one row per pair: max similarity, found_by ORed — a pair
    is found once per clustering and per soft cluster), joins the bucket's ids and shards, puts
    image_a < image_b, appends the kept rows of the old pair file (incremental mode: rows of no
    dirty shard), and replaces the pair file and its manifest atomically. DuckDB runs under the
    step's memory limit and spills to the part folder, so the step's memory does not grow with
    the bucket's pairs.
    """

    def __init__(self, files: CorpusFiles, fit_id: str, bucket: int, rows_per_part: int) -> None:
        self.files, self.fit_id, self.bucket = files, fit_id, int(bucket)
        self.rows_per_part = max(1, int(rows_per_part))
        self.dir = files.fit_dir(fit_id) / "pairs" / f"bucket_{self.bucket:04d}.spill-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.parts: list[Path] = []
        self.rows_added = 0

    def add(self, vi: np.ndarray, vj: np.ndarray, sim: np.ndarray, found_by: np.ndarray) -> None:
        self._buf.append((np.asarray(vi, np.int32), np.asarray(vj, np.int32),
                          np.asarray(sim, np.float32), np.asarray(found_by, np.uint8)))
        self._buffered += len(vi)
        self.rows_added += len(vi)
        if self._buffered >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = [np.concatenate([c[k] for c in self._buf]) if self._buf else np.zeros(0, t)
                for k, t in enumerate((np.int32, np.int32, np.float32, np.uint8))]
        path = self.dir / f"part_{len(self.parts):05d}.parquet"
        pq.write_table(pa.table(dict(zip(("vi", "vj", "sim", "fb"), cols))), path)
        self.parts.append(path)
        self._buf, self._buffered = [], 0

    def finish(self, ids: Sequence[str], partitions: Sequence[str], partition_of: np.ndarray,
               manifest: dict, old_dirty: Sequence[str] | None = None) -> tuple[int, int]:
        """Write the bucket's pair file; (new pairs, pairs in the file). `old_dirty`: keep the old
        file's rows that touch none of these shards (None = no old rows)."""
        import duckdb
        import pyarrow as pa
        import pyarrow.parquet as pq

        from dedup_assets.warehouse import duckdb_memory_limit

        try:
            if self._buf or not self.parts:
                self._flush()
            part_of = np.asarray(partition_of, dtype=np.int32)
            pq.write_table(pa.table({
                "v": np.arange(len(ids), dtype=np.int32),
                "image_id": pa.array(ids, pa.string()),
                "shard": pa.array(list(partitions), pa.string()).take(pa.array(part_of)),
            }), self.dir / "ids.parquet")
            out = self.files.pairs_path(self.fit_id, self.bucket)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + f".tmp-{uuid.uuid4().hex[:8]}")
            parts = "[" + ", ".join(_sql_str(p) for p in self.parts) + "]"
            new = (
                "WITH p AS (SELECT vi, vj, max(sim) AS sim, bit_or(fb) AS fb "
                f"FROM read_parquet({parts}) GROUP BY vi, vj), "
                f"ids AS (SELECT * FROM read_parquet({_sql_str(self.dir / 'ids.parquet')})) "
                "SELECT CASE WHEN a.image_id < b.image_id THEN a.image_id ELSE b.image_id END AS image_a, "
                "CASE WHEN a.image_id < b.image_id THEN b.image_id ELSE a.image_id END AS image_b, "
                "CAST(p.sim AS FLOAT) AS similarity, CAST(p.fb AS UTINYINT) AS found_by, "
                "CASE WHEN a.image_id < b.image_id THEN a.shard ELSE b.shard END AS shard_a, "
                "CASE WHEN a.image_id < b.image_id THEN b.shard ELSE a.shard END AS shard_b "
                "FROM p JOIN ids a ON a.v = p.vi JOIN ids b ON b.v = p.vj"
            )
            old_path = self.files.pairs_path(self.fit_id, self.bucket)
            kept_old = ""
            if old_dirty is not None and old_path.exists():
                dirty = "[" + ", ".join(_sql_str(d) for d in old_dirty) + "]::VARCHAR[]"
                kept_old = (
                    " UNION ALL SELECT image_a, image_b, CAST(similarity AS FLOAT), CAST(found_by AS UTINYINT), "
                    f"shard_a, shard_b FROM read_parquet({_sql_str(old_path)}) "
                    f"WHERE NOT list_contains({dirty}, shard_a) AND NOT list_contains({dirty}, shard_b)"
                )
            con = duckdb.connect(config={"memory_limit": duckdb_memory_limit(),
                                         "temp_directory": str(self.dir / "duckdb_tmp")})
            try:
                # sorted by a hash class of image_a, so that each merge pass reads only its row groups
                con.execute(
                    f"COPY (SELECT *, CAST(hash(image_a) % {PAIR_HASH_CLASSES} AS USMALLINT) AS h FROM ({new}{kept_old}) "
                    f"ORDER BY h) TO {_sql_str(tmp)} (FORMAT parquet, ROW_GROUP_SIZE {PAIR_ROW_GROUP})")
                total = int(con.execute(f"SELECT count(*) FROM read_parquet({_sql_str(tmp)})").fetchall()[0][0])
                n_new = total
                if kept_old:
                    n_new = total - int(con.execute(
                        f"SELECT count(*) FROM ({kept_old.removeprefix(' UNION ALL ')})").fetchall()[0][0])
            finally:
                con.close()
            os.replace(tmp, out)
            mtmp = out.with_suffix(f".json.tmp-{uuid.uuid4().hex[:8]}")
            mtmp.write_text(json.dumps(manifest))
            os.replace(mtmp, out.with_suffix(".json"))
            return n_new, total
        finally:
            self.close()

    def close(self) -> None:
        import shutil

        self._buf = []
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class BucketData:
    vectors: "object"  # dedup.buckets.VectorFiles
    ids: list[str]
    partitions: list[str]
    partition_of: np.ndarray
    entries: dict[str, np.ndarray]
    stamps: dict[str, str]


MERGE_ROWS_PER_PASS = 5_000_000  # bucket pair rows unioned per GROUP BY pass of merge_candidate_pairs
PAIR_HASH_CLASSES = 4096  # a bucket pair file's rows are sorted by h = hash(image_a) % this
PAIR_ROW_GROUP = 32_768  # rows per Parquet row group of a pair file (the unit a merge pass skips or reads)
PAIR_FILE_FORMAT = 2  # in the pair manifest: files of an older format are recomputed, not reused


def merge_candidate_pairs(wh: Warehouse, files: Sequence[Path], rows_per_pass: int = MERGE_ROWS_PER_PASS) -> int:
    """candidate_pairs = the union of the buckets' pairs (one row per pair, found_by ORed), in DuckDB.

    The union runs in passes, each over one range of the hash classes h of image_a (P ranges, P =
    the bucket files' rows / rows_per_pass, from their Parquet footers), so one GROUP BY holds about
    1/P of the pairs; the pair files are sorted by h in row groups of PAIR_ROW_GROUP rows, so a pass
    reads only the row groups of its range and the whole merge reads the files about once. (At 4M a
    single GROUP BY over every bucket's pairs, and then passes of 20M rows that each scanned every
    file, were OOM-killed under a 3 GB cap.)"""
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    passes = max(1, min(PAIR_HASH_CLASSES, -(-int(rows) // max(1, int(rows_per_pass)))))
    bounds = np.linspace(0, PAIR_HASH_CLASSES, passes + 1).round().astype(int).tolist()
    with wh.connect() as con:
        con.execute("SET preserve_insertion_order = false")
        with transaction(con):
            con.execute(
                f"CREATE OR REPLACE TABLE {CANDIDATE_PAIRS} (image_a VARCHAR, image_b VARCHAR, "
                "similarity FLOAT, found_by UTINYINT)"
            )
            if files:
                lit = "[" + ", ".join(_sql_str(p.resolve()) for p in files) + "]"
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    where = f"WHERE h >= {lo} AND h < {hi} " if passes > 1 else ""
                    con.execute(
                        f"INSERT INTO {CANDIDATE_PAIRS} SELECT image_a, image_b, "
                        "CAST(max(similarity) AS FLOAT), CAST(bit_or(found_by) AS UTINYINT) "
                        f"FROM read_parquet({lit}) {where}GROUP BY image_a, image_b"
                    )
        return int(con.execute(f"SELECT count(*) FROM {CANDIDATE_PAIRS}").fetchall()[0][0])


def pair_summary(wh: Warehouse, n_clusterings: int) -> dict:
    """Counts of candidate_pairs: total, per clustering, cumulative over clusterings 0..c."""
    sel = ", ".join(
        [f"count(*) FILTER (WHERE found_by & {1 << c} <> 0) AS c{c}" for c in range(n_clusterings)]
        + [f"count(*) FILTER (WHERE found_by & {(1 << (c + 1)) - 1} <> 0) AS u{c}" for c in range(n_clusterings)]
    )
    with wh.connect() as con:
        row = con.execute(f"SELECT count(*) AS n{', ' + sel if sel else ''} FROM {CANDIDATE_PAIRS}").fetchall()[0]
    n = int(row[0])
    per = [int(v) for v in row[1:1 + n_clusterings]]
    cum = [int(v) for v in row[1 + n_clusterings:]]
    return {"pairs": n, "per_clustering": per, "cumulative": cum}


def verify_dir(wh: Warehouse) -> Path:
    return wh.path.with_name(wh.path.stem + "_files") / "verify"


def candidate_pair_count(wh: Warehouse) -> int:
    with wh.connect() as con:
        if not table_exists(con, CANDIDATE_PAIRS):
            return 0
        return int(con.execute(f"SELECT count(*) FROM {CANDIDATE_PAIRS}").fetchall()[0][0])


def read_candidate_chunk(wh: Warehouse, chunk: int, n_chunks: int) -> pl.DataFrame:
    """The candidate pairs of one verification step (by a hash of image_a, so an image's pairs as
    `a` share a step and its cached features), ordered by image_a, with both images' locations."""
    return wh.query(
        f"SELECT p.image_a, p.image_b, p.similarity, p.found_by, ia.location AS location_a, "
        f"ib.location AS location_b FROM {CANDIDATE_PAIRS} p "
        f"LEFT JOIN {IMAGE_INDEX} ia ON ia.image_id = p.image_a LEFT JOIN {IMAGE_INDEX} ib ON ib.image_id = p.image_b "
        "WHERE hash(p.image_a) % $n = $c ORDER BY p.image_a, p.image_b",
        {"n": int(n_chunks), "c": int(chunk)},
    )


def write_verify_chunk(wh: Warehouse, chunk: int, df: pl.DataFrame) -> Path:
    d = verify_dir(wh)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"chunk_{int(chunk):05d}.parquet"
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
    df.select(list(VERIFIED_SCHEMA)).cast(VERIFIED_SCHEMA).write_parquet(tmp)
    os.replace(tmp, path)
    return path


def clear_verify_chunks(wh: Warehouse) -> None:
    for p in verify_dir(wh).glob("chunk_*.parquet*"):
        p.unlink(missing_ok=True)


_VERIFIED_DDL = (
    "image_a VARCHAR, image_b VARCHAR, similarity FLOAT, found_by UTINYINT, is_duplicate BOOLEAN, "
    "verdict VARCHAR, inliers INTEGER, overlap FLOAT, changed FLOAT, mirrored BOOLEAN, points_a FLOAT[], points_b FLOAT[]"
)


def merge_verified_pairs(wh: Warehouse, chunks: Sequence[Path] | None, tau: float) -> dict:
    """verified_pairs from the steps' chunk files; chunks=None = no verification: every candidate
    pair ≥ τ is a duplicate edge (verdict 'not_verified'). Returns counts by verdict."""
    with wh.connect() as con:
        with transaction(con):
            if chunks is None:
                src = (
                    f"SELECT image_a, image_b, similarity, found_by, similarity >= {float(tau)!r} AS is_duplicate, "
                    "'not_verified' AS verdict, CAST(NULL AS INTEGER) AS inliers, CAST(NULL AS FLOAT) AS overlap, "
                    "CAST(NULL AS FLOAT) AS changed, CAST(NULL AS BOOLEAN) AS mirrored, "
                    f"CAST(NULL AS FLOAT[]) AS points_a, CAST(NULL AS FLOAT[]) AS points_b FROM {CANDIDATE_PAIRS}"
                )
                con.execute(f"CREATE OR REPLACE TABLE {VERIFIED_PAIRS} AS {src} ORDER BY image_a, image_b")
            elif chunks:
                lit = "[" + ", ".join(_sql_str(p.resolve()) for p in chunks) + "]"
                con.execute(
                    f"CREATE OR REPLACE TABLE {VERIFIED_PAIRS} AS SELECT * FROM read_parquet({lit}) ORDER BY image_a, image_b"
                )
            else:
                con.execute(f"CREATE OR REPLACE TABLE {VERIFIED_PAIRS} ({_VERIFIED_DDL})")
        rows = con.execute(
            f"SELECT verdict, count(*), count(*) FILTER (WHERE is_duplicate) FROM {VERIFIED_PAIRS} GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    return {
        "pairs": int(sum(r[1] for r in rows)), "duplicate_edges": int(sum(r[2] for r in rows)),
        "by_verdict": {str(r[0]): int(r[1]) for r in rows},
    }


def _keeper_order(policy: str, priority_column: str | None) -> str:
    if policy == "resolution":
        return ("coalesce(i.width, 0)::DOUBLE * coalesce(i.height, 0)::DOUBLE DESC, "
                "coalesce(i.bytes, 0) DESC, u.image_id")
    if policy == "priority":
        if not priority_column or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", priority_column):
            raise ValueError(f"keeper policy 'priority' needs priority_column = an image_index column, got {priority_column!r}")
        return f'i."{priority_column}" DESC NULLS LAST, u.image_id'
    raise ValueError(f"keeper policy must be 'resolution' or 'priority', got {policy!r}")


def build_duplicate_groups(
    wh: Warehouse, policy: str = "resolution", priority_column: str | None = None, max_rounds: int = 40,
    log: Callable[[str], None] | None = None,
) -> dict:
    """duplicate_groups from the duplicate edges of verified_pairs by the greedy keeper rule (`dedup.groups.greedy_keepers`),
    in DuckDB: rounds that keep every undecided image with no better-ranked image still in play and
    remove the undecided neighbours of kept images; after `max_rounds` the undecided rest (few) is
    finished by `greedy_keepers` in numpy. Returns counts for the asset's metadata."""
    from dedup_assets.dedup.groups import greedy_keepers

    order = _keeper_order(policy, priority_column)
    with wh.connect() as con:
        con.execute(
            "CREATE TEMP TABLE g_pairs AS SELECT image_a, image_b, similarity "
            f"FROM {VERIFIED_PAIRS} WHERE is_duplicate"
        )
        con.execute(
            "CREATE TEMP TABLE g_nodes AS SELECT u.image_id, (row_number() OVER (ORDER BY " + order + ") - 1) AS r "
            "FROM (SELECT image_a AS image_id FROM g_pairs UNION SELECT image_b FROM g_pairs) u "
            f"LEFT JOIN {IMAGE_INDEX} i USING (image_id)"
        )
        con.execute(
            "CREATE TEMP TABLE g_e0 AS SELECT greatest(a.r, b.r) AS u, least(a.r, b.r) AS v, p.similarity AS s "
            "FROM g_pairs p JOIN g_nodes a ON a.image_id = p.image_a JOIN g_nodes b ON b.image_id = p.image_b"
        )
        con.execute("CREATE TEMP TABLE g_e AS SELECT u, v FROM g_e0")
        con.execute("CREATE TEMP TABLE g_s AS SELECT r, CAST(0 AS TINYINT) AS st, CAST(NULL AS BIGINT) AS keeper FROM g_nodes")
        rounds = 0
        undecided = int(con.execute("SELECT count(*) FROM g_s").fetchall()[0][0])
        while undecided and rounds < max_rounds:
            rounds += 1
            con.execute(
                "UPDATE g_s SET st = 1 WHERE st = 0 AND r NOT IN "
                "(SELECT e.u FROM g_e e JOIN g_s b ON b.r = e.v WHERE b.st <> 2)"
            )
            con.execute(
                "UPDATE g_s SET st = 2, keeper = k.kr FROM (SELECT e.u, min(e.v) AS kr FROM g_e e "
                "JOIN g_s b ON b.r = e.v AND b.st = 1 GROUP BY e.u) k WHERE g_s.r = k.u AND g_s.st = 0"
            )
            con.execute("CREATE OR REPLACE TEMP TABLE g_e AS SELECT e.u, e.v FROM g_e e JOIN g_s a ON a.r = e.u AND a.st = 0")
            undecided = int(con.execute("SELECT count(*) FROM g_s WHERE st = 0").fetchall()[0][0])
            if log is not None:
                log(f"groups round {rounds}: {undecided} images undecided")
        residual = undecided
        if undecided:
            nodes = con.execute("SELECT r FROM g_s WHERE st = 0 ORDER BY r").fetchnumpy()["r"].astype(np.int64)
            e = con.execute(
                "SELECT e.u, e.v, z.s FROM g_e e JOIN g_s b ON b.r = e.v AND b.st = 0 "
                "JOIN g_e0 z ON z.u = e.u AND z.v = e.v"
            ).fetchnumpy()
            iu = np.searchsorted(nodes, e["u"].astype(np.int64))
            iv = np.searchsorted(nodes, e["v"].astype(np.int64))
            keeper, _ = greedy_keepers(nodes.size, iu, iv, e["s"].astype(np.float32))
            kept = keeper == np.arange(nodes.size)
            upd = pl.DataFrame({"r": nodes, "st": np.where(kept, 1, 2).astype(np.int8), "keeper": np.where(kept, -1, nodes[keeper])})
            con.register("__upd", upd)
            con.execute(
                "UPDATE g_s SET st = x.st, keeper = CASE WHEN x.st = 2 THEN x.keeper ELSE NULL END "
                "FROM __upd x WHERE g_s.r = x.r"
            )
            con.unregister("__upd")
        # A node is removed as soon as some better-ranked neighbour is kept; its keeper is the
        # best-ranked kept one, which may have been decided in a later round.
        con.execute(
            "UPDATE g_s SET keeper = k.kr FROM (SELECT e.u, min(e.v) AS kr FROM g_e0 e JOIN g_s b ON b.r = e.v "
            "AND b.st = 1 GROUP BY e.u) k WHERE g_s.r = k.u AND g_s.st = 2"
        )
        with transaction(con):
            con.execute(
                f"CREATE OR REPLACE TABLE {DUPLICATE_GROUPS} AS "
                "WITH m AS (SELECT s.r, s.keeper, z.s AS sim FROM g_s s JOIN g_e0 z ON z.u = s.r AND z.v = s.keeper WHERE s.st = 2), "
                "g AS (SELECT keeper, count(*) + 1 AS size, min(sim) AS min_sim FROM m GROUP BY keeper), "
                "rows AS (SELECT r, keeper, sim FROM m UNION ALL SELECT keeper AS r, keeper, 1.0 AS sim FROM g) "
                "SELECT ni.image_id, nk.image_id AS group_id, rows.r = rows.keeper AS is_keeper, "
                "CAST(rows.sim AS FLOAT) AS similarity_to_keeper, CAST(g.size AS INTEGER) AS group_size, "
                "CAST(g.min_sim AS FLOAT) AS group_min_similarity, "
                "CAST(CASE WHEN g.size = 2 THEN 1 - g.min_sim ELSE least(2.0, 2 - 2 * g.min_sim * g.min_sim) END AS FLOAT) AS group_diameter "
                "FROM rows JOIN g USING (keeper) JOIN g_nodes ni ON ni.r = rows.r JOIN g_nodes nk ON nk.r = rows.keeper "
                "ORDER BY group_id, image_id"
            )
        stats = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE is_keeper), coalesce(max(group_size), 0) FROM {DUPLICATE_GROUPS}"
        ).fetchall()[0]
        hist = con.execute(
            f"SELECT group_size, count(*) FROM {DUPLICATE_GROUPS} WHERE is_keeper GROUP BY 1 ORDER BY 1"
        ).fetchall()
        bad = con.execute(  # the invariant: a removed image has a duplicate edge to its keeper (checked, not assumed)
            f"SELECT count(*) FROM {DUPLICATE_GROUPS} d LEFT JOIN g_pairs p ON "
            "(p.image_a = least(d.image_id, d.group_id) AND p.image_b = greatest(d.image_id, d.group_id)) "
            "WHERE NOT d.is_keeper AND p.image_a IS NULL"
        ).fetchall()[0][0]
        for t in ("g_pairs", "g_nodes", "g_e0", "g_e", "g_s"):
            con.execute(f"DROP TABLE IF EXISTS {t}")
    return {
        "rows": int(stats[0]), "groups": int(stats[1]), "largest_group": int(stats[2]),
        "rounds": rounds, "residual": residual, "sizes": [(int(a), int(b)) for a, b in hist],
        "removed_without_pair_to_keeper": int(bad),
    }


# ------------------------------------------------------------- filtered_dataset / removed_images
PREFILTER = "prefilter"
FILTERED_DATASET = "filtered_dataset"
REMOVED_IMAGES = "removed_images"

KEPT_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String, "shard": pl.String, "key": pl.String, "location": pl.String, "caption": pl.String,
    "width": pl.Int32, "height": pl.Int32, "weight": pl.Float64, "caption_hypernymized": pl.String,
}
REMOVED_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String, "shard": pl.String, "reason": pl.String, "detail": pl.String,
}


class SelectionError(ValueError):
    """The inputs of filtered_dataset contradict each other (e.g. a duplicate group with two keepers)."""


def _selection_sql(con, embedded: bool, min_clip_score: float | None = None) -> str:  # noqa: ANN001
    """SELECT of every index row with its removal reason (NULL = kept) and detail.

    Reasons, in order of precedence (the first that applies wins, so every file has exactly one):
    1. `decode:<status>`          the file did not decode (status other than "ok"); detail = error.
    2. `filter:<first reason>`    a pre-filter failed; detail = all reasons joined with ",".
       `filter:clip_score`         (with `min_clip_score`) the image–caption cosine is below it, or
                                   the image has no score; detail = "clip_score=0.1234".
       `filter:classifier:<set>`   a label set's classifier removes it (classifier_scores.remove;
                                   the first set by name when several do).
    3. `duplicate_of:<keeper id>` a non-keeper member of a duplicate group; detail = "similarity=0.9731".
    4. `no_embedding:not_embedded` an ok image with no embedding (only when `embedded`).

    Dedup and filtering are independent masks, as in the seed pipeline: a keeper that fails a filter
    is removed by the filter, and its duplicates still point at it — they are copies of an image we
    decided not to train on, so they go too (no new keeper is promoted). A missing pre-filter table,
    or an image absent from it, counts as passed; an image absent from the groups is unique.
    """
    has_pf = table_exists(con, PREFILTER)
    has_groups = table_exists(con, DUPLICATE_GROUPS)
    error = "CAST(i.error AS VARCHAR)" if "error" in table_columns(con, IMAGE_INDEX) else "CAST(NULL AS VARCHAR)"
    joins, failed, first, reasons, keeper, sim, no_emb = [], "false", "NULL", "NULL", "NULL", "NULL", "false"
    if has_pf:
        joins.append(f"LEFT JOIN {PREFILTER} p ON p.image_id = i.image_id")
        failed, first, reasons = "NOT coalesce(p.passed, true)", "p.reasons[1]", "array_to_string(p.reasons, ',')"
    if has_groups:
        joins.append(
            f"LEFT JOIN (SELECT g.image_id, k.image_id AS keeper, g.similarity_to_keeper AS sim FROM {DUPLICATE_GROUPS} g "
            f"JOIN (SELECT group_id, image_id FROM {DUPLICATE_GROUPS} WHERE is_keeper) k USING (group_id) "
            "WHERE NOT g.is_keeper) k ON k.image_id = i.image_id"
        )
        keeper, sim = "k.keeper", "k.sim"
    clip = "false"
    classified = "NULL"
    if table_exists(con, CLASSIFIER_SCORES) and table_exists(con, LABELS):
        # only sets that still have labels: the scores of a set whose labels are gone remove nothing
        joins.append(f"LEFT JOIN (SELECT image_id, min(label_set) AS label_set FROM {CLASSIFIER_SCORES} WHERE remove "
                     f"AND label_set IN (SELECT DISTINCT label_set FROM {LABELS}) GROUP BY 1) cl "
                     "ON cl.image_id = i.image_id")
        classified = "cl.label_set"
    if min_clip_score is not None:
        if not table_exists(con, CLIP_SCORES):
            raise SelectionError(
                "min_clip_score is set but there are no clip scores: they need the openclip embedder with "
                "clip_score on (`--min-clip-score T` sets both); the offline embedder has no text tower and "
                "external vectors come without one, so this filter is unavailable there")
        joins.append(f"LEFT JOIN {CLIP_SCORES} cs ON cs.image_id = i.image_id")
    if embedded:
        joins.append(f"LEFT JOIN (SELECT DISTINCT image_id FROM {EMBEDDINGS}) e ON e.image_id = i.image_id")
        no_emb = "e.image_id IS NULL"
    if min_clip_score is not None:  # an embedded image without a score (no caption, or embedded before scoring) goes too
        clip = f"(NOT {no_emb} AND (cs.clip_score IS NULL OR cs.clip_score < {float(min_clip_score)!r}))"
    hyp = "CAST(NULL AS VARCHAR)"
    if table_exists(con, CAPTION_HYPERNYMS):  # prefilter with `hypernymize` on
        joins.append(f"LEFT JOIN {CAPTION_HYPERNYMS} hy ON hy.image_id = i.image_id")
        hyp = "hy.caption_hypernymized"
    not_ok = "(i.status IS NULL OR i.status <> 'ok')"
    return (
        "SELECT i.image_id, i.shard, i.key, i.location, i.caption, CAST(i.width AS INTEGER) AS width, "
        f"CAST(i.height AS INTEGER) AS height, {hyp} AS caption_hypernymized, "
        f"CASE WHEN {not_ok} THEN 'decode:' || coalesce(i.status, 'unknown') "
        f"WHEN {failed} THEN 'filter:' || coalesce({first}, 'unknown') "
        f"WHEN {clip} THEN 'filter:clip_score' "
        f"WHEN {classified} IS NOT NULL THEN 'filter:classifier:' || {classified} "
        f"WHEN {keeper} IS NOT NULL THEN 'duplicate_of:' || {keeper} "
        f"WHEN {no_emb} THEN 'no_embedding:not_embedded' END AS reason, "
        f"CASE WHEN {not_ok} THEN {error} WHEN {failed} THEN {reasons} "
        + (f"WHEN {clip} THEN 'clip_score=' || coalesce(CAST(round(CAST(cs.clip_score AS DOUBLE), 4) AS VARCHAR), 'none') "
           if min_clip_score is not None else "")
        + (f"WHEN {classified} IS NOT NULL THEN 'classifier score ≥ threshold' " if classified != "NULL" else "") +
        f"WHEN {keeper} IS NOT NULL THEN 'similarity=' || CAST(round(CAST({sim} AS DOUBLE), 4) AS VARCHAR) END AS detail "
        f"FROM {IMAGE_INDEX} i " + " ".join(joins)
    )


def _check_keepers(con) -> None:  # noqa: ANN001
    if not table_exists(con, DUPLICATE_GROUPS):
        return
    bad = con.execute(
        f"SELECT group_id, count(*) FILTER (WHERE is_keeper) AS k FROM {DUPLICATE_GROUPS} GROUP BY 1 HAVING k <> 1 "
        "ORDER BY group_id"
    ).fetchall()
    if bad:
        several = [g for g, k in bad if k > 1]
        none = [g for g, k in bad if k == 0]
        raise SelectionError(
            "every duplicate group needs exactly one keeper: "
            f"{len(several)} group(s) have several (e.g. {several[:3]}), {len(none)} have none (e.g. {none[:3]}); "
            "rebuild duplicate_groups"
        )


def accounting(con) -> tuple[bool, dict]:  # noqa: ANN001
    """kept + removed == image_index, exactly: the same id set, disjoint, no id twice anywhere.

    Returns (passed, details); details hold counts and up to 20 example ids per kind of problem.
    """
    def ids(sql: str) -> list[str]:
        return [r[0] for r in con.execute(sql + " ORDER BY 1 LIMIT 20").fetchall()]

    out = f"(SELECT image_id FROM {FILTERED_DATASET} UNION ALL SELECT image_id FROM {REMOVED_IMAGES})"
    n = {t: con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM {t}").fetchall()[0]
         for t in (IMAGE_INDEX, FILTERED_DATASET, REMOVED_IMAGES)}
    details = {
        "indexed": int(n[IMAGE_INDEX][0]),
        "kept": int(n[FILTERED_DATASET][0]),
        "removed": int(n[REMOVED_IMAGES][0]),
        "in_both": ids(f"SELECT DISTINCT image_id FROM {FILTERED_DATASET} SEMI JOIN {REMOVED_IMAGES} USING (image_id)"),
        "missing": ids(f"SELECT DISTINCT image_id FROM {IMAGE_INDEX} ANTI JOIN {out} o USING (image_id)"),
        "unknown": ids(f"SELECT DISTINCT image_id FROM {out} o ANTI JOIN {IMAGE_INDEX} USING (image_id)"),
        "duplicated_rows": int(sum(a - b for a, b in n.values())),
    }
    ok = (not details["in_both"] and not details["missing"] and not details["unknown"]
          and details["duplicated_rows"] == 0 and details["kept"] + details["removed"] == details["indexed"])
    return ok, details


def read_accounting(wh: Warehouse) -> tuple[bool, dict]:
    with wh.connect() as con:
        return accounting(con)


def build_filtered_dataset(
    wh: Warehouse,
    clustering: int,
    weigh: Callable[[pl.DataFrame], pl.DataFrame],
    manifest: Path,
    preview_rows: int = 20,
    min_clip_score: float | None = None,
) -> dict:
    """filtered_dataset and removed_images from image_index, prefilter, duplicate_groups and the
    embeddings view, all in DuckDB (nothing per image is held in Python).

    `weigh` gets one row per cluster of clustering `clustering` (cluster, before, after: images
    before filtering and kept) and returns cluster, weight; kept images outside every cluster
    weigh 1. Both tables are replaced in one transaction, which is rolled back (and
    AssertionError raised) unless kept + removed equals the index exactly. The kept rows are
    then written to `manifest` (Parquet, atomically). Returns counts, the per-cluster counts and
    weights, and small previews for metadata.
    """
    manifest = Path(manifest)
    with wh.connect() as con:
        _check_keepers(con)
        embedded = table_exists(con, EMBEDDINGS)
        con.execute("CREATE TEMP TABLE f_sel AS " + _selection_sql(con, embedded, min_clip_score))
        has_clusters = table_exists(con, CLUSTERINGS)
        if has_clusters:
            dup = con.execute(
                f"SELECT count(*) - count(DISTINCT image_id) FROM {CLUSTERINGS} WHERE clustering = ?", [clustering]
            ).fetchall()[0][0]
            if dup:
                raise SelectionError(f"clusterings lists {dup} image(s) twice in clustering {clustering}; rebuild clusterings")
            counts = con.sql(
                "SELECT c.cluster, count(*) AS before, count(*) FILTER (WHERE s.image_id IS NOT NULL AND s.reason IS NULL) "
                f"AS after FROM {CLUSTERINGS} c LEFT JOIN f_sel s USING (image_id) WHERE c.clustering = ? "
                "GROUP BY 1 ORDER BY 1", params=[clustering]
            ).pl()
        else:
            counts = pl.DataFrame(schema={"cluster": pl.Int64, "before": pl.Int64, "after": pl.Int64})
        weights = weigh(counts) if counts.height else pl.DataFrame(schema={"cluster": pl.Int64, "weight": pl.Float64})
        con.register("__w", weights.select(pl.col("cluster").cast(pl.Int64), pl.col("weight").cast(pl.Float64)))
        cl_join = (f"LEFT JOIN {CLUSTERINGS} c ON c.image_id = s.image_id AND c.clustering = {int(clustering)} "
                   "LEFT JOIN __w w ON w.cluster = c.cluster") if has_clusters else "LEFT JOIN __w w ON false"
        try:
            with transaction(con):
                con.execute(
                    f"CREATE OR REPLACE TABLE {FILTERED_DATASET} AS SELECT s.image_id, s.shard, s.key, s.location, "
                    "s.caption, s.width, s.height, CAST(coalesce(w.weight, 1.0) AS DOUBLE) AS weight, "
                    "s.caption_hypernymized "
                    f"FROM f_sel s {cl_join} WHERE s.reason IS NULL ORDER BY s.image_id"
                )
                con.execute(
                    f"CREATE OR REPLACE TABLE {REMOVED_IMAGES} AS SELECT image_id, shard, reason, detail FROM f_sel "
                    "WHERE reason IS NOT NULL ORDER BY image_id"
                )
                ok, details = accounting(con)
                if not ok:
                    raise AssertionError(f"kept + removed does not equal the index: {details}")
        finally:
            con.unregister("__w")
            con.execute("DROP TABLE IF EXISTS f_sel")
        _write_manifest(con, manifest)
        by_kind = con.execute(
            f"SELECT split_part(reason, ':', 1) AS kind, count(*) FROM {REMOVED_IMAGES} GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        kept_preview = con.sql(
            f"SELECT image_id, caption, width, height, weight FROM {FILTERED_DATASET} ORDER BY image_id LIMIT ?",
            params=[preview_rows]).pl()
        removed_preview = con.sql(
            f"SELECT * FROM {REMOVED_IMAGES} ORDER BY image_id LIMIT ?", params=[preview_rows]).pl()
    return {
        **details, "removed_by_kind": {str(k): int(v) for k, v in by_kind}, "counts": counts, "weights": weights,
        "kept_preview": kept_preview, "removed_preview": removed_preview, "manifest": manifest,
    }


def kept_mask(wh: Warehouse, ids: Sequence[str]) -> np.ndarray:
    """For each id (a sample, not every image): is it in filtered_dataset?"""
    if not len(ids):
        return np.zeros(0, bool)
    with wh.connect() as con:
        con.register("__ids", pl.DataFrame({"image_id": list(ids)}, schema={"image_id": pl.String}))
        try:
            kept = set(con.sql(f"SELECT f.image_id FROM {FILTERED_DATASET} f SEMI JOIN __ids USING (image_id)")
                       .pl()["image_id"].to_list())
        finally:
            con.unregister("__ids")
    return np.fromiter((i in kept for i in ids), bool, len(ids))


def reweight_by_log_ratio(
    wh: Warehouse, files: Sequence[Path], scale_from_histogram: Callable[[dict[int, int]], float],
    log_bin: float, min_weight: float, max_weight: float, manifest: Path,
) -> dict:
    """Replace filtered_dataset.weight by clip(s · exp(log_ratio)) from Parquet parts (image_id,
    log_ratio) covering the store, normalized to mean exactly 1, all in DuckDB: the kept rows'
    log-ratio histogram (bins of `log_bin`) is handed to `scale_from_histogram` for s. Rewrites the
    manifest. Kept images without a vector keep their weight before normalization."""
    if not files:
        raise ValueError("no log-ratio parts: nothing to reweight")
    lit = "[" + ", ".join(_sql_str(Path(f).resolve()) for f in files) + "]"
    with wh.connect() as con:
        con.execute(f"CREATE TEMP TABLE __lr AS SELECT image_id, log_ratio FROM read_parquet({lit})")
        try:
            hist = dict(con.execute(
                f"SELECT CAST(round(l.log_ratio / {float(log_bin)!r}) AS BIGINT) AS b, count(*) FROM __lr l "
                f"JOIN {FILTERED_DATASET} f USING (image_id) GROUP BY 1").fetchall())
            s = float(scale_from_histogram({int(k): int(v) for k, v in hist.items()}))
            with transaction(con):
                con.execute(
                    f"UPDATE {FILTERED_DATASET} f SET weight = least(greatest(? * exp(l.log_ratio), ?), ?) "
                    "FROM __lr l WHERE l.image_id = f.image_id", [s, float(min_weight), float(max_weight)])
                mean = float(con.execute(f"SELECT avg(weight) FROM {FILTERED_DATASET}").fetchall()[0][0] or 1.0)
                con.execute(f"UPDATE {FILTERED_DATASET} SET weight = weight / ?", [mean])
            stats = con.execute(
                f"SELECT count(*), min(weight), max(weight), avg(weight) FROM {FILTERED_DATASET}").fetchall()[0]
        finally:
            con.execute("DROP TABLE IF EXISTS __lr")
        _write_manifest(con, Path(manifest))
    return {"scale": s, "kept": int(stats[0]), "min_weight": float(stats[1] or 0), "max_weight": float(stats[2] or 0),
            "mean_weight": float(stats[3] or 0), "histogram_bins": len(hist)}


def weighted_cluster_sums(wh: Warehouse, clustering: int) -> pl.DataFrame:
    """Per cluster of `clustering`: the kept images' summed weight (cluster, weighted)."""
    with wh.connect() as con:
        if not table_exists(con, CLUSTERINGS):
            return pl.DataFrame(schema={"cluster": pl.Int64, "weighted": pl.Float64})
        return con.sql(
            f"SELECT c.cluster, sum(f.weight) AS weighted FROM {FILTERED_DATASET} f JOIN {CLUSTERINGS} c "
            "ON c.image_id = f.image_id AND c.clustering = ? GROUP BY 1 ORDER BY 1", params=[int(clustering)]).pl()


def _write_manifest(con, manifest: Path) -> None:  # noqa: ANN001
    """filtered_dataset as the training manifest (Parquet), written atomically."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".{manifest.name}.tmp-{os.getpid()}")
    con.execute(f"COPY (SELECT * FROM {FILTERED_DATASET} ORDER BY image_id) TO {_sql_str(tmp)} (FORMAT parquet)")
    os.replace(tmp, manifest)


def iter_filtered_dataset(wh: Warehouse, columns: Sequence[str] = tuple(KEPT_SCHEMA)) -> Iterable[pl.DataFrame]:
    """filtered_dataset one shard at a time (ordered by image_id within a shard)."""
    with wh.connect() as con:
        shards = [r[0] for r in con.execute(f"SELECT DISTINCT shard FROM {FILTERED_DATASET} ORDER BY 1").fetchall()]
    cols = ", ".join(f'"{c}"' for c in columns if c in KEPT_SCHEMA)
    for shard in shards:
        with wh.connect() as con:
            frame = con.sql(f"SELECT {cols} FROM {FILTERED_DATASET} WHERE shard = ? ORDER BY image_id", params=[shard]).pl()
        yield frame


# ------------------------------------------------------------------ column schemas for the catalog
# One description per column of every asset's table: `column_schema(table)` turns them, with the
# table's polars schema, into the `dagster/column_schema` metadata the UI shows on each asset.
_PAIR_DOCS = {
    "image_a": "image_id, image_a < image_b", "image_b": "image_id", "similarity": "cosine of the two vectors",
    "found_by": "bitmask of the clusterings whose shared cluster found the pair",
}
COLUMN_DOCS: dict[str, dict[str, str]] = {
    "classifier_scores": {
        "image_id": "image_index.image_id", "label_set": "labels.label_set (one classifier per set)",
        "score": "logistic-regression decision value on the embedding",
        "probability": "calibrated P(positive) among images like the labelled ones (Platt scaling, out-of-fold)",
        "remove": "score ≥ the set's threshold, or the image's own label",
    },
    IMAGE_INDEX: {
        "image_id": "<shard>/<key>, unique", "shard": "partition key", "key": "file stem (escaped)",
        "location": "path, or <tar>::<header offset>/<member>", "caption": "sidecar .txt or metadata caption",
        "url": "from the sidecar .json or metadata", "metadata": "other sidecar/metadata fields, JSON",
        "bytes": "file size", "sha256": "of the file bytes (null when not read)", "format": "decoder's format",
        "width": "px after EXIF orientation", "height": "px after EXIF orientation", "mode": "PIL mode",
        "status": "ok, or why the file gives no image (README 'Input')", "error": "decoder message, sidecar notes",
    },
    "prefilter": {
        "image_id": "image_index.image_id", "shard": "partition key", "passed": "passed every filter",
        "reasons": "every filter that failed (list)", "caption_clean": "caption after mojibake repair",
        "profanity": "profanity probability", "language": "detected language", "language_confidence": "0–1",
        "nsfw": "NSFW score (null when not scored)",
    },
    EMBEDDINGS: {
        "image_id": "image_index.image_id", "shard": "partition key", "embedding": "L2-normalized vector FLOAT[d]",
        "model": "model id that produced it",
    },
    CLUSTERINGS: {
        "image_id": "image_index.image_id", "shard": "partition key", "clustering": "0..C-1 (each fitted on its own sample)",
        "cluster": "nearest centroid", "cluster2": "second-nearest within soft_margin (null without)",
    },
    CANDIDATE_PAIRS: _PAIR_DOCS,
    VERIFIED_PAIRS: {
        **_PAIR_DOCS, "is_duplicate": "an edge of duplicate_groups",
        "verdict": "accepted | undecided:<why> | rejected:<why> | not_verified",
        "inliers": "local-feature matches agreeing with one transform", "overlap": "min covered fraction of the two images",
        "changed": "changed fraction of the aligned overlap (copy notion)", "mirrored": "matched against the mirror image",
        "points_a": "agreeing matches in image_a, x/y as fractions", "points_b": "the same in image_b",
    },
    DUPLICATE_GROUPS: {
        "image_id": "member", "group_id": "the keeper's image_id", "is_keeper": "kept (one per group)",
        "similarity_to_keeper": "cosine to the keeper (1 for the keeper)", "group_size": "members incl. keeper",
        "group_min_similarity": "lowest member similarity to the keeper",
        "group_diameter": "1 − similarity for pairs, else the bound 2 − 2·m²",
    },
    FILTERED_DATASET: {
        "image_id": "kept image", "shard": "partition key", "key": "file stem", "location": "where to read it",
        "caption": "cleaned caption", "width": "px", "height": "px",
        "weight": "loss weight restoring the pre-filter cluster distribution (mean 1)",
        "caption_hypernymized": "caption with proper names replaced by hypernyms (prefilters.hypernymize; else null)",
    },
    "regurgitation_audit": {
        "generated": "generated image (path under the generated folder) or vector key", "prompt": "its prompt sidecar",
        "rank": "1 = nearest training image", "image_id": "training image", "similarity": "cosine",
        "flagged": "a near-copy (≥ τ, or verified)", "kept_in_filtered": "the training image is in filtered_dataset",
        "verdict": "verification verdict, as in verified_pairs",
    },
}


def column_schema(table: str, schema: dict | None = None):  # noqa: ANN201 - dagster TableSchema
    """`dagster.TableSchema` of one of our tables: column names and types from `schema` (a polars
    schema; default the table's own) and the descriptions of COLUMN_DOCS."""
    from dagster import TableColumn, TableSchema

    docs = COLUMN_DOCS.get(table, {})
    if schema is None:
        schema = _SCHEMAS[table]()
    return TableSchema(columns=[
        TableColumn(name=name, type=str(dtype), description=docs.get(name)) for name, dtype in schema.items()
    ])


def _prefilter_schema() -> dict:
    from dedup_assets.filters.run import PREFILTER_SCHEMA

    return PREFILTER_SCHEMA


def _groups_schema() -> dict:
    from dedup_assets.dedup.groups import GROUP_SCHEMA

    return GROUP_SCHEMA


def _audit_schema() -> dict:
    from dedup_assets.audit.search import AUDIT_SCHEMA

    return AUDIT_SCHEMA


_SCHEMAS: dict[str, Callable[[], dict]] = {
    IMAGE_INDEX: lambda: IMAGE_INDEX_SCHEMA,
    "prefilter": _prefilter_schema,
    EMBEDDINGS: lambda: {"image_id": pl.String, "shard": pl.String, "embedding": "FLOAT[d]", "model": pl.String},
    CLUSTERINGS: lambda: CLUSTERINGS_SCHEMA,
    CANDIDATE_PAIRS: lambda: PAIRS_SCHEMA,
    VERIFIED_PAIRS: lambda: VERIFIED_SCHEMA,
    DUPLICATE_GROUPS: _groups_schema,
    FILTERED_DATASET: lambda: KEPT_SCHEMA,
    "regurgitation_audit": _audit_schema,
    CLASSIFIER_SCORES: lambda: CLASSIFIER_SCORES_SCHEMA,
}
