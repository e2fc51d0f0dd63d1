"""Curate stage: `filtered_dataset` (kept rows with weights, every removal accounted for) and
`regurgitation_audit` (nearest training images of a model's generated images)."""


import time
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from dedup_assets.audit.report import audit_markdown, write_audit_html
from dedup_assets.audit.search import AUDIT_SCHEMA, AuditConfig, audit_table, discover_generated, streamed_top_k
from dedup_assets.curate.export import export_shards, write_manifest
from dedup_assets.curate.reweight import ReweightConfig, compute_weights, reweight_report
from dedup_assets.curate.select import check_accounting, select
from dedup_assets.defs.dedup import load_vectors
from dedup_assets.defs.metadata import counts_md, markdown_preview, png_markdown
from dedup_assets.defs.resources import DatasetResource, EmbedderResource, WarehouseResource
from dedup_assets.embed.pipeline import embed_stream

GROUP = "curate"


class CurateResource(ConfigurableResource):
    """Reweighting, export and audit settings."""

    reweight_clustering: int = Field(default=0, description="Which clustering's clusters are the categories.")
    min_weight: float = Field(default=0.1)
    max_weight: float = Field(default=10.0)
    export_shards: bool = Field(
        default=False, description="Also write img2dataset-style shards of the kept images (hard links)."
    )
    audit_top_k: int = Field(default=5)
    audit_threshold: float | None = Field(
        default=None, description="Cosine at/above which a generated image is flagged; None = embedder's calibration."
    )


def _table_or_none(wh, table: str) -> pl.DataFrame | None:
    return wh.read_table(table) if wh.table_exists(table) else None


@asset(
    group_name=GROUP,
    deps=["image_index", "prefilter", "embeddings", "clusterings", "duplicate_groups"],
    kinds={"duckdb", "parquet"},
    description=(
        "One row per image that survives decoding, the filters and deduplication, with a loss "
        "weight that restores the pre-filter cluster distribution. Every other indexed image is in "
        "`removed_images` with its reason."
    ),
)
def filtered_dataset(
    context: AssetExecutionContext, curate: CurateResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    started = time.perf_counter()
    index = wh.read_table("image_index")
    pre = _table_or_none(wh, "prefilter")
    groups = _table_or_none(wh, "duplicate_groups")
    embedded = wh.query("SELECT image_id FROM embeddings")["image_id"] if wh.table_exists("embeddings") else None
    kept, removed = select(index, pre, groups, embedded)

    clusters = wh.query(
        "SELECT image_id, cluster FROM clusterings WHERE clustering = $c", {"c": curate.reweight_clustering}
    )
    cfg = ReweightConfig(
        clustering=curate.reweight_clustering, min_weight=curate.min_weight, max_weight=curate.max_weight
    )
    weights = compute_weights(clusters, kept["image_id"], cfg)
    kept = (
        kept.drop("weight")
        .join(weights.select("image_id", "weight"), on="image_id", how="left")
        .with_columns(pl.col("weight").fill_null(1.0))
        .select("image_id", "shard", "key", "location", "caption", "width", "height", "weight")
        .sort("image_id")
    )
    wh.replace_table("filtered_dataset", kept)
    wh.replace_table("removed_images", removed.sort("image_id"))
    report = reweight_report(clusters, kept["image_id"], weights, cfg)

    out_dir = warehouse.directory
    manifest = write_manifest(kept, out_dir / "filtered_dataset.parquet")
    meta: dict = {}
    if curate.export_shards:
        meta["export"] = MetadataValue.json(export_shards(kept, out_dir / "filtered_shards"))
    seconds = time.perf_counter() - started
    by_reason = (
        removed.with_columns(pl.col("reason").str.split(":").list.first().alias("kind"))
        .group_by("kind").len().rows()
    )
    meta.update(
        {
            "dagster/row_count": kept.height,
            "indexed": index.height,
            "kept": kept.height,
            "removed": removed.height,
            "removed_by_kind": counts_md({k: int(n) for k, n in by_reason}),
            "tv_distance_unweighted": round(float(report["tv_unweighted"]), 6),
            "tv_distance_weighted": round(float(report["tv_weighted"]), 6),
            "manifest": MetadataValue.path(str(manifest)),
            "seconds": round(seconds, 3),
            "preview": markdown_preview(kept.select("image_id", "caption", "width", "height", "weight")),
            "removed_preview": markdown_preview(removed),
        }
    )
    if report.get("plot_png"):
        meta["largest_shifts"] = png_markdown(report["plot_png"], "largest cluster shifts")
    return MaterializeResult(metadata=meta)


@asset_check(
    asset=filtered_dataset,
    blocking=True,
    description="kept + removed = indexed, exactly: every indexed image is kept or has a removal reason.",
)
def filtered_dataset_accounting(warehouse: WarehouseResource) -> AssetCheckResult:
    wh = warehouse.get()
    ok, details = check_accounting(
        wh.read_table("image_index"), wh.read_table("filtered_dataset"), wh.read_table("removed_images")
    )
    return AssetCheckResult(
        passed=bool(ok),
        metadata={k: (MetadataValue.json(v) if isinstance(v, list) else v) for k, v in details.items()},
    )


@asset(
    group_name=GROUP,
    deps=["embeddings", "filtered_dataset"],
    pool="gpu",
    kinds={"duckdb", "faiss"},
    description=(
        "One row per (generated image, rank): its nearest training images over the whole indexed "
        "set before deduplication, whether each is a near-copy (flagged), and whether it survived "
        "into filtered_dataset."
    ),
)
def regurgitation_audit(
    context: AssetExecutionContext,
    dataset: DatasetResource,
    embedder: EmbedderResource,
    curate: CurateResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    wh = warehouse.get()
    if not dataset.generated:
        wh.replace_table("regurgitation_audit", pl.DataFrame(schema=AUDIT_SCHEMA))
        context.log.warning("no generated-images folder configured (--generated / DEDUP_ASSETS_GENERATED)")
        return MaterializeResult(
            metadata={"dagster/row_count": 0, "note": "no generated-images folder configured"}
        )
    emb = embedder.get()
    train_ids, train_x, train_model = load_vectors(wh)
    if train_model and train_model != emb.model_id:
        raise RuntimeError(
            f"the training set was embedded with {train_model!r} but the audit embedder is "
            f"{emb.model_id!r}: similarities across models are meaningless. Use the same embedder "
            f"for both (or re-embed the training set)."
        )
    gen = discover_generated(Path(dataset.generated))
    started = time.perf_counter()
    result = embed_stream(
        emb,
        ((gid, path.read_bytes()) for gid, path, _ in gen),
        batch_size=embedder.batch_size,
        workers=0,
    )
    for gid, reason, err in result.failures:
        context.log.warning(f"generated image {gid} could not be decoded ({reason}): {err}")
    prompts = {gid: prompt for gid, _, prompt in gen}
    kept_ids = wh.query("SELECT image_id FROM filtered_dataset")["image_id"]
    tau = float(curate.audit_threshold if curate.audit_threshold is not None else emb.duplicate_threshold)
    cfg = AuditConfig(top_k=curate.audit_top_k, threshold=tau)
    top = streamed_top_k(result.vectors, [(train_ids, train_x)], cfg.top_k)
    table = audit_table(result.ids, [prompts.get(g) for g in result.ids], top, kept_ids.to_list(), tau)
    wh.replace_table("regurgitation_audit", table)
    locs = wh.read_table("image_index", columns=["image_id", "location"]).filter(
        pl.col("image_id").is_in(table["image_id"].unique().to_list())
    )
    html = write_audit_html(
        table,
        {gid: path for gid, path, _ in gen},
        dict(zip(locs["image_id"].to_list(), locs["location"].to_list())),
        warehouse.directory / "regurgitation_audit.html",
    )
    flagged = table.filter(pl.col("flagged"))
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "generated_images": len(result.ids),
            "undecodable_generated": len(result.failures),
            "flagged_generated": flagged["generated"].n_unique(),
            "threshold": tau,
            "training_vectors_searched": len(train_ids),
            "seconds": round(time.perf_counter() - started, 3),
            "report": MetadataValue.md(audit_markdown(table)),
            "html_report": MetadataValue.path(str(html)),
        }
    )


@asset_check(
    asset=regurgitation_audit,
    description="Fails when any generated image is a near-copy of a training image, listing them.",
)
def no_regurgitation(warehouse: WarehouseResource) -> AssetCheckResult:
    flagged = warehouse.get().query(
        "SELECT generated, image_id, similarity, kept_in_filtered FROM regurgitation_audit "
        "WHERE flagged ORDER BY similarity DESC"
    )
    return AssetCheckResult(
        passed=flagged.height == 0,
        metadata={
            "flagged_pairs": flagged.height,
            "near_copies": markdown_preview(flagged, limit=50),
        },
    )
