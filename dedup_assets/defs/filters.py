"""Filter stage: the per-shard `prefilter` asset (image, caption and content-safety filters)."""


import time

import polars as pl
from dagster import AssetExecutionContext, ConfigurableResource, MaterializeResult, MetadataValue
from PIL import Image
from pydantic import Field

from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.partitions import per_shard_asset
from dedup_assets.defs.resources import WarehouseResource, config_from
from dedup_assets.filters.config import PrefilterConfig, check_dependencies
from dedup_assets.filters.run import has_image_data, run_prefilter, summarize_prefilter
from dedup_assets.ingest.decode import decode_rgb
from dedup_assets.ingest.shards import read_location
from dedup_assets.tables import read_image_index

GROUP = "filters"


class PrefilterResource(ConfigurableResource):
    """Thresholds of the Conceptual-Captions-style filters; all of them appear in run metadata."""

    min_side: int = Field(default=400, description="Minimum width and height in pixels (CC: 400).")
    max_aspect_ratio: float = Field(default=2.0, description="Maximum long side / short side (CC: 2).")
    max_file_bytes: int | None = Field(default=None, description="Remove files larger than this, in bytes (None = no limit).")
    languages: list[str] | None = Field(
        default=["en"], description="Allowed caption languages (ISO 639-1); null disables the check."
    )
    profanity: bool = Field(default=True, description="Remove captions the profanity model scores above profanity_threshold.")
    nsfw: bool = Field(default=False, description="Run the offline NSFW detector (extra 'nsfw').")
    nsfw_threshold: float = Field(default=0.3, description="Lower removes more (biased toward removal).")

    def config(self) -> PrefilterConfig:
        return config_from(self, PrefilterConfig, languages=tuple(self.languages) if self.languages else None)


def _load_image(location: str) -> Image.Image:
    return decode_rgb(read_location(location), target_side=320)


@per_shard_asset(
    "prefilter",
    GROUP,
    deps=["image_index"],
    pool="gpu",
    kinds={"duckdb", "python"},
    description=(
        "One row per indexed file of the shard: whether it passed the image, caption and content "
        "filters, every reason it failed, and the scores behind them."
    ),
)
def prefilter(
    context: AssetExecutionContext,
    prefilters: PrefilterResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    cfg = prefilters.config()
    check_dependencies(cfg)
    wh = warehouse.get()
    started = time.perf_counter()
    frames = []
    no_image = 0
    for shard in context.partition_keys:
        index = read_image_index(wh, shard)
        part = run_prefilter(index, cfg, load_image=_load_image, log=context.log.info)
        no_image += sum(  # external embeddings: image-only rules were skipped on these rows
            st == "ok" and not has_image_data(f, b)
            for f, b, st in zip(index["format"].to_list(), index["bytes"].to_list(), index["status"].to_list())
        )
        wh.replace_partition("prefilter", part, "shard", shard)
        frames.append(part)
    df = pl.concat(frames) if frames else pl.DataFrame()
    seconds = time.perf_counter() - started
    summary = summarize_prefilter(df)
    passed = int(df["passed"].sum()) if df.height else 0
    removed_by = {str(k): int(v) for k, v in (summary.get("removed_by_reason") or {}).items()}
    return MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "passed": passed,
            "removed": df.height - passed,
            "removed_by_reason": counts_table(removed_by),
            "examples_by_reason": MetadataValue.json(summary.get("examples", {})),
            "thresholds": MetadataValue.json(cfg.describe()),
            "image_rules_skipped_no_image_data": MetadataValue.int(no_image),
            "seconds": round(seconds, 3),
            "preview": table_preview(
                df.filter(~pl.col("passed")).with_columns(pl.col("reasons").list.join(","))
                .select("image_id", "reasons", "caption_clean")
            ),
        }
    )
