"""The code location loads; the sensor and the schedule discover shards."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import DagsterInstance, Definitions, build_schedule_context, build_sensor_context

from dedup_assets.definitions import build_definitions
from dedup_assets.defs.ingest import discover_shards_job, shard_sensor
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.defs.resources import DatasetResource, WarehouseResource
from dedup_assets.settings import Settings
from dedup_assets.warehouse import Warehouse

EXPECTED_ASSETS = {
    "image_index",
    "prefilter",
    "embeddings",
    "clusterings",
    "verified_pairs",
    "candidate_pairs",
    "duplicate_groups",
    "filter_classifiers",
    "filtered_dataset",
    "regurgitation_audit",
}


def _shard_folder(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "a.txt").write_text("caption")


def test_definitions_load_with_every_asset_check_sensor_and_schedule(tmp_path: Path) -> None:
    defs = build_definitions(Settings(source=str(tmp_path), warehouse=str(tmp_path / "w.duckdb")))
    Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {"candidate_pairs_recall", "filtered_dataset_accounting", "no_regurgitation"} <= checks
    assert {s.name for s in repo.sensor_defs} == {"shard_sensor", "label_sensor"}
    assert repo.get_job("classifier_job").partitions_def.name == "label_sets"  # one partition per label set
    assert {s.name for s in repo.schedule_defs} == {"discovery_schedule", "corpus_schedule"}
    defs_by_key = {k.to_user_string(): repo.assets_defs_by_key[k] for k in repo.assets_defs_by_key}
    assert defs_by_key["embeddings"].op.pool == "gpu" and defs_by_key["clusterings"].op.pool == "gpu"
    # the pair search is a graph: a plan step, one GPU-pool step per bucket, a merge step
    graph = defs_by_key["candidate_pairs"].node_def
    ops = {n.name: n.definition for n in graph.nodes}
    assert set(ops) == {"plan_bucket_search", "search_bucket", "merge_bucket_pairs"}
    assert ops["search_bucket"].pool == "gpu"
    # verification is a graph too: a plan step, one step per chunk of pairs, a merge step
    vgraph = defs_by_key["verified_pairs"].node_def
    assert {n.name for n in vgraph.nodes} == {"plan_verification", "verify_chunk", "merge_verification"}


def test_module_level_defs_read_the_settings_file(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import dedup_assets.definitions as d
    from dedup_assets.settings import ENV_SETTINGS, write_settings_file

    for name in [k for k in __import__("os").environ if k.startswith("DEDUP_ASSETS_") and k != ENV_SETTINGS]:
        monkeypatch.delenv(name)
    write_settings_file(Settings(source=str(tmp_path / "src"), warehouse=str(tmp_path / "w.duckdb"), min_side=77))
    assert isinstance(d.defs, Definitions)
    resources = d.build_definitions().resources  # what `defs = build_definitions()` does on import
    assert resources["warehouse"].path == str(tmp_path / "w.duckdb")
    assert resources["dataset"].source == str(tmp_path / "src")
    assert resources["prefilters"].min_side == 77


def test_catalog_has_owners_tags_real_kinds_and_code_references(tmp_path: Path) -> None:
    from dedup_assets.definitions import OWNERS, catalog_assets

    def specs(settings: Settings, git=None) -> dict:  # noqa: ANN001
        return {s.key.to_user_string(): s for a in catalog_assets(settings, git) for s in a.specs}

    base = dict(source=str(tmp_path), warehouse=str(tmp_path / "w.duckdb"))
    offline = specs(Settings(**base, device="cpu"))
    assert set(offline) == EXPECTED_ASSETS
    for key, spec in offline.items():
        assert spec.owners == OWNERS, key
        assert spec.tags["stage"] == spec.group_name, key
        assert spec.tags["scale"] == ("per-shard" if key in ("image_index", "prefilter", "embeddings") else
                                      "per-label-set" if key == "filter_classifiers" else "corpus")
        (ref,) = spec.metadata["dagster/code_references"].code_references
        lines = Path(ref.file_path).read_text().splitlines()
        assert f"def {key}(" in "\n".join(lines[ref.line_number - 1: ref.line_number + 15]), (key, ref)
    # what really runs: numpy for the offline embedder and faiss k-means on the CPU; PyTorch for open_clip / a GPU
    assert offline["embeddings"].kinds == {"parquet", "numpy"} and offline["clusterings"].kinds == {"duckdb", "faiss"}
    torch = specs(Settings(**base, embedder="openclip", device="cuda"))
    assert torch["embeddings"].kinds == {"parquet", "pytorch"} and torch["clusterings"].kinds == {"duckdb", "pytorch"}
    # with a git remote, references link to the file at its line in the repository
    linked = specs(Settings(**base), ("https://github.com/example/dedup-assets", "main"))
    (url,) = linked["filtered_dataset"].metadata["dagster/code_references"].code_references
    assert url.url.startswith("https://github.com/example/dedup-assets/tree/main/dedup_assets/defs/curate.py#L")


def test_sensor_adds_partitions_and_requests_runs_only_for_new_shards(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "src"
    _shard_folder(root, "00000")
    _shard_folder(root, "it's shard (1)")
    (root / "bad,name").mkdir()  # not a valid partition key: skipped with a warning
    dataset = DatasetResource(source=str(root))

    ctx = build_sensor_context(instance=instance, resources={"dataset": dataset})
    res = shard_sensor(ctx)
    assert sorted(r.partition_key for r in res.run_requests) == ["00000", "it's shard (1)"]
    assert sorted(res.dynamic_partitions_requests[0].partition_keys) == ["00000", "it's shard (1)"]
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, list(res.dynamic_partitions_requests[0].partition_keys))

    ctx2 = build_sensor_context(instance=instance, resources={"dataset": dataset}, cursor=res.cursor)
    res2 = shard_sensor(ctx2)
    assert res2.run_requests == [] and not res2.dynamic_partitions_requests

    _shard_folder(root, "00002")
    ctx3 = build_sensor_context(instance=instance, resources={"dataset": dataset}, cursor=res2.cursor)
    res3 = shard_sensor(ctx3)
    assert [r.partition_key for r in res3.run_requests] == ["00002"]
    assert set(json.loads(res3.cursor)) == {"00000", "it's shard (1)", "00002"}


def test_discovery_schedule_runs_the_job_that_registers_shards(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "src"
    _shard_folder(root, "a")
    _shard_folder(root, "b")
    defs = build_definitions(Settings(source=str(root), warehouse=str(tmp_path / "w.duckdb"), discovery_cron="*/5 * * * *"))
    schedule = defs.get_schedule_def("discovery_schedule")
    assert schedule.cron_schedule == "*/5 * * * *"
    requests = schedule.evaluate_tick(build_schedule_context(instance=instance)).run_requests
    assert len(requests) == 1 and requests[0].job_name in (None, "discover_shards_job")

    (root / "stats.parquet").write_bytes(b"not a shard")
    wh = tmp_path / "w.duckdb"
    result = discover_shards_job.execute_in_process(
        instance=instance,
        resources={"dataset": DatasetResource(source=str(root)), "warehouse": WarehouseResource(path=str(wh))},
    )
    assert result.success
    assert sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)) == ["a", "b"]
    # The entries that are not shards are recorded, not dropped silently.
    assert Warehouse(wh).query("SELECT shard, entry, reason FROM skipped_entries").rows() == [
        ("", "stats.parquet", "not_a_shard")
    ]


def test_every_launchpad_field_says_what_it_does() -> None:
    from dedup_assets.definitions import build_definitions

    missing = [(name, field) for name, r in build_definitions().resources.items()
               for field, info in type(r).model_fields.items() if not info.description]
    assert missing == []
