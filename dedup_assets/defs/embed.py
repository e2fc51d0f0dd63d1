"""Embedding stage: the per-shard `embeddings` asset (vectors stored as DuckDB FLOAT[d])."""


import time
from typing import Iterator

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from dedup_assets.defs.metadata import counts_md, markdown_preview
from dedup_assets.defs.partitions import SHARD_BACKFILL_POLICY, shards_partitions
from dedup_assets.defs.resources import DatasetResource, EmbedderResource, WarehouseResource
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.ingest.shards import ReadLimits, Shard, find_shard, iter_shard

GROUP = "embed"


class ModelMismatchError(RuntimeError):
    """The warehouse holds vectors of another model; mixing them would make similarities meaningless."""


def embeddings_frame(ids: list[str], shard: str, vectors: np.ndarray, model_id: str) -> pl.DataFrame:
    """One row per embedded image: image_id, shard, embedding FLOAT[d], model."""
    d = int(vectors.shape[1]) if vectors.ndim == 2 and vectors.shape[0] else 0
    return pl.DataFrame(
        {
            "image_id": ids,
            "shard": [shard] * len(ids),
            "embedding": vectors.astype(np.float32, copy=False) if len(ids) else np.zeros((0, max(d, 1)), np.float32),
            "model": [model_id] * len(ids),
        },
        schema={
            "image_id": pl.String,
            "shard": pl.String,
            "embedding": pl.Array(pl.Float32, max(d, 1)),
            "model": pl.String,
        },
    )


def _ok_records(shard: Shard, ok_ids: set[str], limits: ReadLimits) -> Iterator[tuple[str, bytes]]:
    for rec in iter_shard(shard, limits):
        image_id = f"{shard.name}/{rec.key}"
        if image_id in ok_ids:
            yield image_id, rec.data


@asset(
    partitions_def=shards_partitions,
    backfill_policy=SHARD_BACKFILL_POLICY,
    group_name=GROUP,
    deps=["image_index"],
    pool="gpu",
    kinds={"duckdb", "pytorch"},
    description=(
        "One row per decodable image of the shard: its L2-normalized embedding (FLOAT[d]) and the "
        "id of the model that made it."
    ),
)
def embeddings(
    context: AssetExecutionContext,
    dataset: DatasetResource,
    embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    wh = warehouse.get()
    emb = embedder.get()
    shards = list(context.partition_keys)
    _guard_one_model(context, wh, emb.model_id, shards, embedder.on_model_change)
    started = time.perf_counter()
    rows = 0
    failures: list[tuple[str, str, str]] = []
    missing = 0
    for name in shards:
        shard = find_shard(dataset.root, name, dataset.follow_links)
        ok_ids = set(
            wh.query(
                "SELECT image_id FROM image_index WHERE shard = $shard AND status = 'ok'", {"shard": shard.name}
            )["image_id"].to_list()
        )
        context.log.info(f"[{shard.name}] embedding {len(ok_ids)} images with {emb.model_id}")

        def progress(n: int, elapsed: float, name: str = shard.name, total: int = len(ok_ids)) -> None:
            context.log.info(f"[{name}] embedded {n}/{total} ({n / max(elapsed, 1e-9):.1f} images/s)")

        result = embed_stream(
            emb,
            _ok_records(shard, ok_ids, dataset.read_limits),
            batch_size=embedder.batch_size,
            workers=embedder.workers,
            decode_side=getattr(emb, "decode_side", None),
            progress=progress,
        )
        df = embeddings_frame(result.ids, shard.name, result.vectors, emb.model_id)
        if df.height:
            wh.replace_partition("embeddings", df, "shard", shard.name)
        else:
            wh.delete_partition("embeddings", "shard", shard.name)
        rows += df.height
        failures.extend(result.failures)
        missing += len(ok_ids) - df.height - len(result.failures)
    seconds = time.perf_counter() - started
    fail_df = pl.DataFrame(
        failures, schema={"image_id": pl.String, "reason": pl.String, "error": pl.String}, orient="row"
    )
    by_reason = fail_df.group_by("reason").len().rows() if fail_df.height else []
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "model": emb.model_id,
            "dimension": emb.dim,
            "failed_to_decode": fail_df.height,
            "failures_by_reason": counts_md({r: int(n) for r, n in by_reason}),
            "failures_preview": markdown_preview(fail_df),
            "missing_from_shard": missing,
            "seconds": round(seconds, 3),
            "images_per_second": round(rows / max(seconds, 1e-9), 1),
            "storage": MetadataValue.text("DuckDB table embeddings, column embedding FLOAT[d]"),
        }
    )


def _guard_one_model(context, wh, model_id: str, shards: list[str], on_change: str) -> None:  # noqa: ANN001
    """Refuse (or, with on_model_change='reset', clear) vectors of another model in other shards."""
    if not wh.table_exists("embeddings"):
        return
    other = wh.query(
        "SELECT model, count(*) AS n FROM embeddings WHERE NOT list_contains($shards, shard) "
        "AND model <> $model GROUP BY model",
        {"shards": shards, "model": model_id},
    )
    if not other.height:
        return
    n, models = int(other["n"].sum()), other["model"].to_list()
    if on_change == "fail":
        raise ModelMismatchError(
            f"the warehouse holds {n} vectors of {models} but this run embeds with {model_id!r}; "
            f"vectors of two models cannot be compared. Re-embed every shard with one model "
            f"(`dedup-assets run` does, or set the embedder resource's on_model_change='reset'), "
            f"or go back to the previous embedder."
        )
    context.log.warning(f"deleting {n} vectors of {models}: every shard must be re-embedded with {model_id}")
    with wh.connect() as con:
        con.execute("DELETE FROM embeddings WHERE model <> ?", [model_id])


@asset_check(asset=embeddings, description="Every stored vector is unit-norm and all come from one model.")
def embeddings_unit_norm_one_model(warehouse: WarehouseResource) -> AssetCheckResult:
    wh = warehouse.get()
    stats = wh.query(
        "SELECT count(DISTINCT model) AS models, "
        "coalesce(max(abs(sqrt(list_dot_product(embedding::FLOAT[], embedding::FLOAT[])) - 1)), 0) AS worst "
        "FROM embeddings"
    ).row(0, named=True)
    passed = stats["models"] <= 1 and stats["worst"] < 1e-3
    return AssetCheckResult(
        passed=passed,
        metadata={"models": int(stats["models"]), "worst_norm_error": float(stats["worst"])},
    )
