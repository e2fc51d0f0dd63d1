"""What a user trains on: kept/removed accounting, reweighting, export (pure, no Dagster)."""

from dedup_assets.curate.export import export_shards, write_manifest
from dedup_assets.curate.reweight import ReweightConfig, compute_weights, reweight_report, total_variation
from dedup_assets.curate.select import KEPT_SCHEMA, REMOVED_SCHEMA, check_accounting, select

__all__ = [
    "KEPT_SCHEMA",
    "REMOVED_SCHEMA",
    "ReweightConfig",
    "check_accounting",
    "compute_weights",
    "export_shards",
    "reweight_report",
    "select",
    "total_variation",
    "write_manifest",
]
