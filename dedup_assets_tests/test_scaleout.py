"""Scale-out on an existing engine: the same assets run with Dagster's Dask executor on a local
`distributed` cluster of worker processes, and give the same warehouse rows as the in-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset

DASK_CONFIG = {"execution": {"config": {"cluster": {"local": {"n_workers": 2, "threads_per_worker": 1, "processes": True}}}}}


@pytest.mark.slow
def test_dask_executor_runs_the_shard_and_corpus_jobs(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = tmp_path / "wh.duckdb"
    # Dask workers rebuild the code location from the module, which reads its settings from the environment.
    monkeypatch.setenv("DEDUP_ASSETS_SOURCE", str(small_dataset.root))
    monkeypatch.setenv("DEDUP_ASSETS_WAREHOUSE", str(warehouse))
    monkeypatch.setenv("DEDUP_ASSETS_MIN_SIDE", "64")
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, small_dataset.shards)
    repo = ReconstructableRepository.for_module("dedup_assets.definitions", "defs", working_directory=str(tmp_path))

    for shard in small_dataset.shards:
        with execute_job(
            repo.get_reconstructable_job("shard_job_dask"), instance=instance, run_config=DASK_CONFIG,
            tags={"dagster/partition": shard},
        ) as result:
            assert result.success
    with execute_job(repo.get_reconstructable_job("corpus_job_dask"), instance=instance, run_config=DASK_CONFIG) as result:
        assert result.success

    wh = Warehouse(warehouse)
    index = wh.read_table("image_index")
    assert sorted(index["shard"].unique().to_list()) == small_dataset.shards
    kept = wh.read_table("filtered_dataset")
    removed = wh.read_table("removed_images")
    assert kept.height + removed.height == index.height
    groups = wh.read_table("duplicate_groups")
    grouped = set(groups["image_id"].to_list())
    assert set(small_dataset.planted) <= grouped
