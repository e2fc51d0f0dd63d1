"""What a user trains on: reweighting and export (pure, no Dagster). The kept/removed split and its
accounting live in SQL in the table layer (`tables.build_filtered_dataset`)."""

from dedup_assets.curate.export import export_shards
from dedup_assets.curate.reweight import (
    ReweightConfig,
    cluster_weights,
    compute_weights,
    report_from_counts,
    reweight_report,
    total_variation,
)

__all__ = [
    "ReweightConfig",
    "cluster_weights",
    "compute_weights",
    "export_shards",
    "report_from_counts",
    "reweight_report",
    "total_variation",
]
