"""Curate stage: `filtered_dataset` (kept rows with weights, every removal accounted for)."""


import time

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

from dedup_assets import tables
from dedup_assets.curate.export import export_shards
from dedup_assets.curate.reweight import ReweightConfig, cluster_weights, report_from_counts
from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.resources import WarehouseResource, config_from

GROUP = "curate"


class CurateResource(ConfigurableResource):
    """Reweighting and export settings."""

    reweight_clustering: int = Field(default=0, description="Which clustering's clusters are the categories.")
    min_weight: float = Field(default=0.1, description="Smallest loss weight a kept image gets (clip range of reweighting).")
    max_weight: float = Field(default=10.0, description="Largest loss weight a kept image gets.")
    export_shards: bool = Field(
        default=False, description="Also write img2dataset-style shards of the kept images (hard links)."
    )


@asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": tables.column_schema("filtered_dataset")},
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
    cfg = config_from(curate, ReweightConfig, clustering=curate.reweight_clustering)
    out_dir = warehouse.directory
    built = tables.build_filtered_dataset(
        wh, cfg.clustering, lambda counts: cluster_weights(counts, cfg), out_dir / "filtered_dataset.parquet"
    )
    report = report_from_counts(built["counts"], built["weights"], cfg)
    meta: dict = {}
    if curate.export_shards:
        meta["export"] = MetadataValue.json(export_shards(tables.iter_filtered_dataset(wh), out_dir / "filtered_shards"))
    seconds = time.perf_counter() - started
    context.log.info(
        f"filtered_dataset: {built['indexed']:,} indexed → {built['kept']:,} kept, {built['removed']:,} removed "
        f"in {seconds:.1f} s ({built['indexed'] / max(seconds, 1e-9):,.0f} rows/s)"
    )
    meta.update(
        {
            "dagster/row_count": built["kept"],
            "indexed": built["indexed"],
            "kept": built["kept"],
            "removed": built["removed"],
            "removed_by_kind": counts_table(built["removed_by_kind"]),
            "tv_distance_unweighted": round(float(report["tv_unweighted"]), 6),
            "tv_distance_weighted": round(float(report["tv_weighted"]), 6),
            "manifest": warehouse.link(built["manifest"]),
            "seconds": round(seconds, 3),
            "preview": table_preview(built["kept_preview"]),
            "removed_preview": table_preview(built["removed_preview"]),
        }
    )
    if report.get("plot_png"):
        meta["largest_shifts"] = warehouse.plot(report["plot_png"], "largest cluster shifts", "filtered_dataset_shifts")
    return MaterializeResult(metadata=meta)


@asset_check(
    asset=filtered_dataset,
    blocking=True,
    description="kept + removed = indexed, exactly: every indexed image is kept or has a removal reason.",
)
def filtered_dataset_accounting(warehouse: WarehouseResource) -> AssetCheckResult:
    ok, details = tables.read_accounting(warehouse.get())
    return AssetCheckResult(
        passed=bool(ok),
        metadata={k: (MetadataValue.json(v) if isinstance(v, list) else v) for k, v in details.items()},
    )
