"""Embedding stage: the per-shard `embeddings` asset.

Vectors go to the embedding store (one Parquet file per partition, `dedup_assets.store`); DuckDB
sees them through the view `embeddings` (`dedup_assets.tables`). For a dataset of external
embeddings (clip-retrieval layout) the asset copies the file pair's vectors, normalized, into the
store instead of embedding images.
"""


import time
from typing import Iterator

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset_check,
)

from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.partitions import per_shard_asset
from dedup_assets.defs.resources import DatasetResource, EmbedderResource, WarehouseResource
from dedup_assets.embed.base import image_text_cosine
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.ingest.clip_retrieval import EmbeddingsInputError, discover_parts, iter_ok_vectors, open_vectors
from dedup_assets.ingest.shards import ReadLimits, Shard, find_shard, iter_shard
from dedup_assets.tables import (
    CLIP_SCORES_SCHEMA,
    delete_clip_scores,
    delete_embeddings,
    embedding_store,
    ensure_embeddings,
    partition_models,
    read_image_index,
    write_clip_scores,
    write_embeddings,
)

GROUP = "embed"


class ModelMismatchError(RuntimeError):
    """The warehouse holds vectors of another model; mixing them would make similarities meaningless."""


def _ok_records(shard: Shard, ok_ids: set[str], limits: ReadLimits) -> Iterator[tuple[str, bytes]]:
    for rec in iter_shard(shard, limits):
        image_id = f"{shard.name}/{rec.key}"
        if image_id in ok_ids:
            yield image_id, rec.data


@per_shard_asset(
    "embeddings",
    GROUP,
    deps=["image_index"],
    pool="gpu",
    kinds={"parquet", "pytorch"},
    description=(
        "One vector per decodable image of the shard (or per good row of an external img_emb file): "
        "L2-normalized float32, with the id of the model that made it, in the embedding store "
        "(one Parquet file per partition); DuckDB view `embeddings`."
    ),
)
def embeddings(
    context: AssetExecutionContext,
    dataset: DatasetResource,
    embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    wh = warehouse.get()
    shards = list(context.partition_keys)
    store = ensure_embeddings(wh, log=context.log.info)
    if dataset.is_external:
        return _import_external(context, dataset, embedder, warehouse, store, shards)
    if embedder.clip_score and embedder.kind != "openclip":
        raise ValueError(
            f"clip_score needs the openclip embedder (its text tower); the {embedder.kind} embedder has none, so the "
            "image–caption filter is unavailable with it (turn clip_score and curate.min_clip_score off)")
    emb = embedder.get()
    _guard_one_model(context, wh, emb.model_id, shards, embedder.on_model_change)
    scored: list[float] = []
    started = time.perf_counter()
    rows = 0
    failures: list[tuple[str, str, str]] = []
    missing = 0
    for name in shards:
        shard = find_shard(dataset.root, name, dataset.follow_links)
        ok_rows = read_image_index(wh, shard.name, status="ok")
        ok_ids = set(ok_rows["image_id"].to_list())
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
        n_vec = len(result.ids)
        if n_vec:
            write_embeddings(wh, shard.name, [(result.ids, result.vectors)], emb.model_id, int(result.vectors.shape[1]))
        else:
            delete_embeddings(wh, shard.name)
        delete_clip_scores(wh, shard.name)  # scores always belong to the vectors just written
        if embedder.clip_score and n_vec:
            captions = dict(zip(ok_rows["image_id"].to_list(), ok_rows["caption"].to_list()))
            texts = [(captions.get(i) or "").strip() for i in result.ids]
            t = emb.embed_texts(texts)
            cos = image_text_cosine(result.vectors, t)
            cos = [float(c) if txt else None for c, txt in zip(cos.tolist(), texts)]  # no caption: no score
            write_clip_scores(wh, shard.name, pl.DataFrame({
                "image_id": result.ids, "shard": [shard.name] * n_vec, "clip_score": cos,
                "model": [emb.model_id] * n_vec}, schema=CLIP_SCORES_SCHEMA))
            have = [c for c in cos if c is not None]
            scored.extend(have)
            context.log.info(f"[{shard.name}] clip scores of {len(have)} captioned images"
                             + (f": median {np.median(have):.3f}" if have else ""))
        rows += n_vec
        failures.extend(result.failures)
        missing += len(ok_ids) - n_vec - len(result.failures)
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
            "failures_by_reason": counts_table({r: int(n) for r, n in by_reason}),
            "failures_preview": table_preview(fail_df),
            "missing_from_shard": missing,
            "seconds": round(seconds, 3),
            "images_per_second": round(rows / max(seconds, 1e-9), 1),
            "storage": warehouse.link(store.root),
            **({"clip_score_quantiles": MetadataValue.json(
                {q: round(float(np.quantile(scored, q / 100)), 4) for q in (1, 10, 50, 90, 99)})} if scored else {}),
        }
    )


def _guard_one_model(context, wh, model_id: str, shards: list[str], on_change: str) -> None:  # noqa: ANN001
    """Refuse (or, with on_model_change='reset', clear) vectors of another model in other partitions."""
    other = {p: m for p, m in partition_models(wh).items() if p not in shards and m != model_id}
    if not other:
        return
    store = embedding_store(wh)
    n, models = store.count(list(other)), sorted(set(other.values()))
    if on_change == "fail":
        raise ModelMismatchError(
            f"the warehouse holds {n} vectors of {models} but this run embeds with {model_id!r}; "
            f"vectors of two models cannot be compared. Re-embed every shard with one model "
            f"(`dedup-assets run` does, or set the embedder resource's on_model_change='reset'), "
            f"or go back to the previous embedder."
        )
    context.log.warning(f"deleting {n} vectors of {models}: every shard must be re-embedded with {model_id}")
    for partition in other:
        delete_embeddings(wh, partition)


def _import_external(  # noqa: ANN202
    context, dataset: DatasetResource, embedder: EmbedderResource, warehouse: WarehouseResource, store,  # noqa: ANN001
    keys: list[str],
):
    """Copy the vectors of clip-retrieval file pairs into the store: the rows image_index marked ok,
    L2-normalized, streamed in batches from the memory-mapped npy."""
    wh = warehouse.get()
    if embedder.kind != "external":
        raise RuntimeError(
            f"the dataset holds external embeddings but the embedder is {embedder.kind!r}; set the embedder "
            f"resource's kind to 'external' (dedup-assets run --embeddings does)"
        )
    model_id = embedder.model_id
    _guard_one_model(context, wh, model_id, keys, embedder.on_model_change)
    parts = {p.partition: p for p in discover_parts(dataset.root)}
    started = time.perf_counter()
    rows = 0
    skipped = 0
    for key in keys:
        if key not in parts:
            raise EmbeddingsInputError(f"no file pair for partition {key!r} under {dataset.root}")
        part = parts[key]
        x = open_vectors(part)
        others = [p for p in store.partitions() if p not in keys]
        dim = store.dim() if others else None
        if dim is not None and x.shape[1] != dim:
            raise EmbeddingsInputError(
                f"{part.npy} has dimension {x.shape[1]} but the store holds {dim}-d vectors "
                f"(partitions {others[:3]}): all files must come from one model"
            )
        ok_ids = set(read_image_index(wh, key, status="ok")["image_id"].to_list())
        t0 = time.perf_counter()
        n = write_embeddings(wh, key, iter_ok_vectors(part, ok_ids, dataset.batch_rows), model_id, int(x.shape[1]))
        rows += n
        skipped += int(x.shape[0]) - n
        dt = time.perf_counter() - t0
        context.log.info(f"[{key}] stored {n} of {x.shape[0]} vectors ({x.dtype}) in {dt:.2f}s ({n / max(dt, 1e-9):.0f}/s)")
    seconds = time.perf_counter() - started
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "model": model_id,
            "dimension": store.dim() or 0,
            "source": MetadataValue.text(f"external embeddings under {dataset.root}"),
            "rows_without_vector": skipped,
            "seconds": round(seconds, 3),
            "vectors_per_second": round(rows / max(seconds, 1e-9), 1),
            "storage": warehouse.link(store.root),
        }
    )


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
