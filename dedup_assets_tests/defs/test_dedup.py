"""The dedup stage wired: incremental dedup of a new shard against the corpus."""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, CORPUS_ASSETS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.dedup import DedupResource
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.defs.wiring import latest_meta, small_settings


def test_new_shard_is_deduplicated_incrementally_against_the_corpus(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = small_settings(small_dataset, tmp_path)
    resources = build_resources(settings)
    # the second shard doubles this tiny corpus; a real corpus grows by much less per shard
    resources["dedup"] = DedupResource(refit_factor=4.0)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, small_dataset.shards)

    def per_shard(shard: str) -> None:
        assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key=shard,
                           resources=resources, instance=instance).success

    def corpus(refit: bool = False) -> None:
        assert materialize(ALL_ASSETS + ALL_CHECKS, selection=CORPUS_ASSETS, resources=resources, instance=instance,
                           run_config={"ops": {"clusterings": {"config": {"refit": refit}}}}).success

    per_shard("s0")
    corpus()
    assert latest_meta(instance, "clusterings")["mode"] == "full"
    per_shard("s1")  # a new shard arrives
    corpus()
    assert latest_meta(instance, "clusterings")["mode"] == "incremental"
    assert latest_meta(instance, "candidate_pairs")["mode"] == "incremental"
    wh = Warehouse(settings.warehouse)
    inc_groups = wh.read_table("duplicate_groups")
    group_of = dict(zip(inc_groups["image_id"].to_list(), inc_groups["group_id"].to_list()))
    for copy_id, base_id in small_dataset.planted.items():  # cross-shard copies joined old groups
        assert copy_id in group_of and group_of.get(base_id) == group_of[copy_id], (copy_id, base_id)
    inc_pairs = set(wh.read_table("candidate_pairs").select("image_a", "image_b").iter_rows())

    corpus(refit=True)  # the explicit full refit finds the same duplicates
    assert latest_meta(instance, "clusterings")["mode"] == "full"
    full_pairs = set(wh.read_table("candidate_pairs").select("image_a", "image_b").iter_rows())
    planted_pairs = {tuple(sorted(p)) for p in small_dataset.planted.items()}
    assert planted_pairs & full_pairs <= inc_pairs
