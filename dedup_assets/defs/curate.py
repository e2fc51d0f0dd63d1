"""Curate stage: `filtered_dataset` (kept rows with weights, every removal accounted for)."""


import time
from typing import Literal

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
    min_clip_score: float | None = Field(
        default=None,
        description="Remove images whose cosine with their caption (clip_scores, from open_clip's text tower) is "
        "below this, reason filter:clip_score (LAION used 0.28 for ViT-B-32). None = off.",
    )
    reweight_method: Literal["clusters", "classifier"] = Field(
        default="clusters",
        description="'clusters': each kept image weighs its cluster's share before / after filtering; 'classifier' "
        "(the seed's): a logistic regression tells pre-filter from kept images on the embeddings and each kept "
        "image weighs the density ratio p_pre/p_kept (README 'Reweighting').",
    )
    reweight_sample: int = Field(
        default=20_000, description="Pre-filter vectors sampled from the store to fit the classifier ('classifier')."
    )
    export_shards: bool = Field(
        default=False, description="Also write img2dataset-style shards of the kept images (hard links)."
    )


@asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": tables.column_schema("filtered_dataset")},
    deps=["image_index", "prefilter", "embeddings", "clusterings", "duplicate_groups", "filter_classifiers"],
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
        wh, cfg.clustering, lambda counts: cluster_weights(counts, cfg), out_dir / "filtered_dataset.parquet",
        min_clip_score=curate.min_clip_score,
    )
    report = report_from_counts(built["counts"], built["weights"], cfg)
    meta: dict = {"reweight_method": curate.reweight_method}
    classifier_meta: dict = {}
    if curate.reweight_method == "classifier":
        classifier_meta = _classifier_weights(context, curate, warehouse, cfg, built["manifest"], built["counts"])
        built["kept_preview"] = wh.query(
            "SELECT image_id, caption, width, height, weight FROM filtered_dataset ORDER BY image_id LIMIT 20")
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
    unscored = tables.unscored_by_label_set(wh)
    if unscored:  # vectors newer than a set's last scoring: those images pass its filter unseen
        context.log.warning(
            "embedded images without a score of their label set's classifier (kept unless another rule removes "
            f"them; materialize filter_classifiers[<set>], or turn label_sensor on): {unscored}")
    meta["classifier_unscored_images"] = MetadataValue.json(unscored)
    meta.update(classifier_meta)  # the classifier's weights replace the cluster weights' figures
    if report.get("plot_png") and not classifier_meta:
        meta["largest_shifts"] = warehouse.plot(report["plot_png"], "largest cluster shifts", "filtered_dataset_shifts")
    return MaterializeResult(metadata=meta)


def _classifier_weights(context: AssetExecutionContext, curate: CurateResource, warehouse: WarehouseResource,
                        cfg: ReweightConfig, manifest, built_counts) -> dict:  # noqa: ANN001
    """The seed's reweighting (`curate.density`): fit on a store sample (the kept ones among it are a
    sample of the kept set), log ratios streamed over the store into Parquet parts, weights set in DuckDB."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup_assets.curate.density import LOG_BIN, fit_density_ratio, scale_from_histogram

    wh = warehouse.get()
    store = tables.embedding_store(wh)
    ids, x = store.sample(curate.reweight_sample, seed=17)
    kept = tables.kept_mask(wh, ids)
    model = fit_density_ratio(x, kept, cfg.min_weight, cfg.max_weight)
    context.log.info(
        f"density-ratio classifier on {model.n_train[0]} pre-filter / {model.n_train[1]} kept vectors: held-out AUC "
        f"{model.auc_unweighted:.3f} unweighted, {model.auc_weighted:.3f} weighted (0.5 = the cut is undone)")
    out = warehouse.directory / "reweight"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part_*.parquet"):
        old.unlink()
    parts = []
    for n, (_, bids, bx) in enumerate(store.iter_batches(batch_rows=65_536)):
        part = out / f"part_{n:05d}.parquet"
        pq.write_table(pa.table({"image_id": bids, "log_ratio": model.log_ratio(bx)}), part)
        parts.append(part)
    done = tables.reweight_by_log_ratio(
        wh, parts, lambda h: scale_from_histogram(h, cfg.min_weight, cfg.max_weight), LOG_BIN,
        cfg.min_weight, cfg.max_weight, manifest)
    for p in parts:
        p.unlink()
    sums = tables.weighted_cluster_sums(wh, cfg.clustering)
    counts = built_counts.join(sums, on="cluster", how="left").fill_null(0.0)
    tv = 0.5 * float((counts["before"] / max(counts["before"].sum(), 1)
                      - counts["weighted"] / max(counts["weighted"].sum(), 1e-12)).abs().sum()) if counts.height else 0.0
    return {
        "tv_distance_weighted": round(tv, 6),  # over clustering `reweight_clustering`, with these weights
        "classifier_auc_unweighted": round(model.auc_unweighted, 4),
        "classifier_auc_weighted": round(model.auc_weighted, 4),
        "classifier_training_vectors": MetadataValue.json(list(model.n_train)),
        "weight_range": MetadataValue.json([round(done["min_weight"], 4), round(done["max_weight"], 4)]),
        "kept_fraction_of_sample": round(float(np.mean(kept)) if len(kept) else 0.0, 4),
    }


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
