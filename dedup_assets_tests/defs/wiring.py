"""Helpers of the wiring tests: settings for the small dataset, per-shard materializations, metadata."""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.settings import Settings
from dedup_assets_tests.conftest import SmallDataset


def small_settings(ds: SmallDataset, tmp_path: Path) -> Settings:
    return Settings(
        source=str(ds.root), warehouse=str(tmp_path / "wh.duckdb"), generated=str(ds.generated), min_side=64
    )


def materialize_shards(ds: SmallDataset, settings: Settings, instance: DagsterInstance, selection,
                       resources: dict | None = None) -> None:
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ds.shards)
    resources = resources or build_resources(settings)
    for shard in ds.shards:
        result = materialize(
            ALL_ASSETS + ALL_CHECKS, selection=selection, partition_key=shard, resources=resources, instance=instance
        )
        assert result.success


def latest_meta(instance: DagsterInstance, key: str) -> dict:
    from dagster import AssetKey

    ev = instance.get_latest_materialization_event(AssetKey(key))
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}
