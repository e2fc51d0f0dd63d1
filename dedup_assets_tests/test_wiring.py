"""Wiring: the real assets materialized with `dagster.materialize` into a DuckDB file in tmp_path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import polars as pl
from dagster import DagsterInstance, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, CORPUS_ASSETS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.dedup import DedupResource
from dedup_assets.defs.embed import embeddings
from dedup_assets.defs.ingest import image_index
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.settings import Settings
from dedup_assets.tables import embedding_store, embeddings_kind
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset


def _settings(ds: SmallDataset, tmp_path: Path) -> Settings:
    return Settings(
        source=str(ds.root), warehouse=str(tmp_path / "wh.duckdb"), generated=str(ds.generated), min_side=64
    )


def _materialize_shards(ds: SmallDataset, settings: Settings, instance: DagsterInstance, selection) -> None:
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ds.shards)
    resources = build_resources(settings)
    for shard in ds.shards:
        result = materialize(
            ALL_ASSETS + ALL_CHECKS, selection=selection, partition_key=shard, resources=resources, instance=instance
        )
        assert result.success


def test_image_index_rows_and_rematerialize_does_not_duplicate(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = _settings(small_dataset, tmp_path)
    _materialize_shards(small_dataset, settings, instance, [image_index])
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
    _materialize_shards(small_dataset, settings, instance, [image_index])  # again
    assert wh.read_table("image_index").height == before
    mat = instance.get_latest_materialization_event(image_index.key)
    assert mat is not None and "rejected_by_reason" in mat.asset_materialization.metadata


def test_embeddings_vectors_read_back(small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance) -> None:
    settings = _settings(small_dataset, tmp_path)
    _materialize_shards(small_dataset, settings, instance, [image_index, embeddings])
    wh = Warehouse(settings.warehouse)
    ok_ids = wh.query("SELECT image_id FROM image_index WHERE status = 'ok' ORDER BY image_id")["image_id"].to_list()
    ids, x = wh.read_vectors("embeddings", "image_id", "embedding")
    assert ids == ok_ids
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    models = wh.query("SELECT DISTINCT model FROM embeddings")["model"].to_list()
    assert len(models) == 1 and models[0].startswith("dedup-assets/offline")
    # the vectors live in the store, one Parquet file per shard; DuckDB sees them through a view
    store = embedding_store(wh)
    assert sorted(p.name for p in store.root.iterdir()) == ["s0.parquet", "s1.parquet"]
    assert store.count() == len(ok_ids)
    assert embeddings_kind(wh) == "VIEW"


def test_whole_graph_finds_planted_copies_and_accounts_for_every_file(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = dataclasses.replace(_settings(small_dataset, tmp_path), report_base_url="http://reports.example:3001/")
    _materialize_shards(small_dataset, settings, instance, PER_SHARD_ASSETS)
    result = materialize(
        ALL_ASSETS + ALL_CHECKS, selection=CORPUS_ASSETS, resources=build_resources(settings), instance=instance
    )
    assert result.success
    wh = Warehouse(settings.warehouse)

    # the review pages are links under the configured base URL, and they link to each other
    base = "http://reports.example:3001/"
    assert _latest_meta(instance, "duplicate_groups")["review_page"] == base + "duplicate_groups.html"
    audit_meta = _latest_meta(instance, "regurgitation_audit")
    assert audit_meta["html_report"] == base + "regurgitation_audit.html"
    assert audit_meta["groups_page"] == base + "duplicate_groups.html"
    assert _latest_meta(instance, "filtered_dataset")["manifest"] == base + "filtered_dataset.parquet"
    files = Path(settings.warehouse).parent / "wh_files"
    # previews are inline tables; plots are files under the served folder, shown by a short markdown image
    from dagster import AssetKey, TableMetadataValue

    raw = instance.get_latest_materialization_event(AssetKey("filtered_dataset")).asset_materialization.metadata
    assert isinstance(raw["preview"], TableMetadataValue) and len(raw["preview"].records) == 10
    plot = _latest_meta(instance, "duplicate_groups")["group_size_histogram"]
    assert plot == f"![group size histogram]({base}plots/duplicate_groups_sizes.png)"
    assert (files / "plots" / "duplicate_groups_sizes.png").read_bytes().startswith(b"\x89PNG")
    audit_page = (files / "regurgitation_audit.html").read_text(encoding="utf-8")
    groups_page = (files / "duplicate_groups.html").read_text(encoding="utf-8")
    assert "href='duplicate_groups.html#img-" in audit_page
    assert "<a href='regurgitation_audit.html'>regurgitation audit</a>" in groups_page
    assert "class=badge href='regurgitation_audit.html#gen-" in groups_page  # a planted copy's training image

    groups = wh.read_table("duplicate_groups")
    group_of = dict(zip(groups["image_id"].to_list(), groups["group_id"].to_list()))
    for copy_id, base_id in small_dataset.planted.items():
        assert copy_id in group_of and group_of.get(base_id) == group_of[copy_id], (copy_id, base_id)
    assert groups.group_by("group_id").agg(pl.col("is_keeper").sum())["is_keeper"].to_list() == [1] * groups["group_id"].n_unique()

    # the offline embedder verifies: candidates searched below τ, each with a verdict; a removed
    # image's edge to its keeper was accepted by the verifier, or undecided and ≥ τ
    verified = wh.read_table("verified_pairs")
    cand = wh.read_table("candidate_pairs")
    assert verified.height == cand.height > 0
    assert verified["verdict"].str.starts_with("accepted").any()
    assert not verified["verdict"].is_in(["not_verified"]).any()
    tau = float(_latest_meta(instance, "verified_pairs")["threshold"])
    assert float(cand["similarity"].min()) < tau  # the search reached below τ
    edge = {(a, b): (d, v, s) for a, b, d, v, s in verified.select(
        "image_a", "image_b", "is_duplicate", "verdict", "similarity").iter_rows()}
    for r in groups.filter(~pl.col("is_keeper")).iter_rows(named=True):
        d, v, sim = edge[(min(r["image_id"], r["group_id"]), max(r["image_id"], r["group_id"]))]
        assert d and (v == "accepted" or (v.startswith("undecided") and sim >= tau)), (r, v, sim)

    index = wh.read_table("image_index")
    kept = wh.read_table("filtered_dataset")
    removed = wh.read_table("removed_images")
    assert kept.height + removed.height == index.height
    assert set(kept["image_id"]) | set(removed["image_id"]) == set(index["image_id"])
    assert abs(kept["weight"].mean() - 1.0) < 1e-6
    reasons = dict(zip(removed["image_id"].to_list(), removed["reason"].to_list()))
    assert reasons["s0/truncated"] == "decode:truncated"
    dup_removed = [r for r in reasons.values() if r.startswith("duplicate_of:")]
    assert len(dup_removed) >= len(small_dataset.planted) // 2

    audit = wh.read_table("regurgitation_audit")
    flagged = set(audit.filter(pl.col("flagged"))["generated"].to_list())
    assert set(small_dataset.generated_copies) <= flagged
    assert not flagged & set(small_dataset.generated_novel)

    checks = {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["filtered_dataset_accounting"] is True
    assert checks["no_regurgitation"] is False  # the planted copies are near-copies
    assert "candidate_pairs_recall" in checks
    assert (Path(settings.warehouse).parent / "wh_files" / "filtered_dataset.parquet").exists()

    # the catalog's column schema of every asset is the table's real columns, each described
    from dedup_assets.definitions import build_definitions
    from dedup_assets.warehouse import table_columns

    # the README's schema table names every table of the warehouse and every column of each
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Warehouse schema"):]
    section = section[: section.index("\n## ", 5)]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)`[^|]*\|[^|]*\| (.*) \|$", section, re.M)}
    with wh.connect() as con:
        real = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert real <= set(rows) and set(rows) - real <= {"shard_state"}, (set(rows) ^ real)  # shard_state: the CLI's
        for table in real:
            missing = [c for c in table_columns(con, table) if c not in rows[table]]
            assert not missing, (table, missing)

    graph = build_definitions(settings).resolve_asset_graph()
    with wh.connect() as con:
        for key in graph.get_all_asset_keys():
            schema = graph.get(key).metadata["dagster/column_schema"]
            assert [c.name for c in schema.columns] == table_columns(con, key.to_user_string()), key
            assert all(c.description for c in schema.columns), key


def test_changing_the_embedder_fails_instead_of_mixing_models(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = _settings(small_dataset, tmp_path)
    _materialize_shards(small_dataset, settings, instance, [image_index, embeddings])
    wh = Warehouse(settings.warehouse)
    store = embedding_store(wh)  # pretend shard s1 was embedded by another model
    store.write_partition("s1", *store.read_partition("s1"), model="open_clip/other")
    assert wh.query("SELECT DISTINCT model FROM embeddings WHERE shard = 's1'")["model"].to_list() == ["open_clip/other"]
    resources = build_resources(settings)
    result = materialize(
        [image_index, embeddings], selection=[embeddings], partition_key="s0", resources=resources,
        instance=instance, raise_on_error=False,
    )
    assert not result.success
    errors = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
    messages = [err.message + (err.cause.message if err.cause else "") for err in errors]
    assert any("cannot be compared" in m for m in messages)


def _latest_meta(instance: DagsterInstance, key: str) -> dict:
    from dagster import AssetKey

    ev = instance.get_latest_materialization_event(AssetKey(key))
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


def test_new_shard_is_deduplicated_incrementally_against_the_corpus(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = _settings(small_dataset, tmp_path)
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
    assert _latest_meta(instance, "clusterings")["mode"] == "full"
    per_shard("s1")  # a new shard arrives
    corpus()
    assert _latest_meta(instance, "clusterings")["mode"] == "incremental"
    assert _latest_meta(instance, "candidate_pairs")["mode"] == "incremental"
    wh = Warehouse(settings.warehouse)
    inc_groups = wh.read_table("duplicate_groups")
    group_of = dict(zip(inc_groups["image_id"].to_list(), inc_groups["group_id"].to_list()))
    for copy_id, base_id in small_dataset.planted.items():  # cross-shard copies joined old groups
        assert copy_id in group_of and group_of.get(base_id) == group_of[copy_id], (copy_id, base_id)
    inc_pairs = set(wh.read_table("candidate_pairs").select("image_a", "image_b").iter_rows())

    corpus(refit=True)  # the explicit full refit finds the same duplicates
    assert _latest_meta(instance, "clusterings")["mode"] == "full"
    full_pairs = set(wh.read_table("candidate_pairs").select("image_a", "image_b").iter_rows())
    planted_pairs = {tuple(sorted(p)) for p in small_dataset.planted.items()}
    assert planted_pairs & full_pairs <= inc_pairs
