"""The ingest stage wired: image_index materialized per shard into a real warehouse."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from dagster import DagsterInstance

from dedup_assets.defs.ingest import image_index
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.defs.wiring import materialize_shards, small_settings


def test_image_index_rows_and_rematerialize_does_not_duplicate(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = small_settings(small_dataset, tmp_path)
    materialize_shards(small_dataset, settings, instance, [image_index])
    wh = Warehouse(settings.warehouse)
    df = wh.read_table("image_index")
    assert set(df["shard"].unique()) == {"s0", "s1"}
    statuses = dict(zip(df["image_id"].to_list(), df["status"].to_list()))
    for image_id, reason in small_dataset.hostile.items():
        assert statuses[image_id] == reason
    ok = df.filter(pl.col("status") == "ok")
    assert ok.height == df.height - len(small_dataset.hostile)
    row = df.filter(pl.col("image_id") == "s1/b001").row(0, named=True)
    assert row["caption"] == "a picture number 1 of a calm scene"
    assert row["url"] == "https://example.org/1.jpg"
    assert row["location"].startswith(str(small_dataset.root / "s1.tar"))
    assert len(row["sha256"]) == 64 and row["width"] > 0 and row["format"] == "JPEG"
    before = df.height
    materialize_shards(small_dataset, settings, instance, [image_index])  # again
    assert wh.read_table("image_index").height == before
    mat = instance.get_latest_materialization_event(image_index.key)
    assert mat is not None and "rejected_by_reason" in mat.asset_materialization.metadata
