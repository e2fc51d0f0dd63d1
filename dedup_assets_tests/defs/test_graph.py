"""The whole graph wired: every asset materialized on the small dataset, checked end to end
(planted copies, accounting, links between the pages, the catalog's and the README's schemas)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import polars as pl
from dagster import DagsterInstance, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, CORPUS_ASSETS, PER_SHARD_ASSETS, build_resources
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.defs.wiring import latest_meta, materialize_shards, small_settings


def test_whole_graph_finds_planted_copies_and_accounts_for_every_file(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = dataclasses.replace(small_settings(small_dataset, tmp_path), report_base_url="http://reports.example:3001/")
    materialize_shards(small_dataset, settings, instance, PER_SHARD_ASSETS)
    result = materialize(
        ALL_ASSETS + ALL_CHECKS, selection=CORPUS_ASSETS, resources=build_resources(settings), instance=instance
    )
    assert result.success
    wh = Warehouse(settings.warehouse)

    # the review pages are links under the configured base URL, and they link to each other
    base = "http://reports.example:3001/"
    assert latest_meta(instance, "duplicate_groups")["review_page"] == base + "duplicate_groups.html"
    audit_meta = latest_meta(instance, "regurgitation_audit")
    assert audit_meta["html_report"] == base + "regurgitation_audit.html"
    assert audit_meta["groups_page"] == base + "duplicate_groups.html"
    assert latest_meta(instance, "filtered_dataset")["manifest"] == base + "filtered_dataset.parquet"
    files = Path(settings.warehouse).parent / "wh_files"
    # previews are inline tables; plots are files under the served folder, shown by a short markdown image
    from dagster import AssetKey, TableMetadataValue

    raw = instance.get_latest_materialization_event(AssetKey("filtered_dataset")).asset_materialization.metadata
    assert isinstance(raw["preview"], TableMetadataValue) and len(raw["preview"].records) == 10
    plot = latest_meta(instance, "duplicate_groups")["group_size_histogram"]
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
    tau = float(latest_meta(instance, "verified_pairs")["threshold"])
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
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Warehouse schema"):]
    section = section[: section.index("\n## ", 5)]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)`[^|]*\|[^|]*\| (.*) \|$", section, re.M)}
    with wh.connect() as con:
        real = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert real <= set(rows) and set(rows) - real <= {"shard_state", "clip_scores", "labels", "caption_hypernyms", "classifier_scores",
                                                    "label_queue"}, (set(rows) ^ real)  # the CLI's; open_clip's; label sets' (test_filters)
        for table in real:
            missing = [c for c in table_columns(con, table) if c not in rows[table]]
            assert not missing, (table, missing)

    graph = build_definitions(settings).resolve_asset_graph()
    with wh.connect() as con:
        for key in graph.get_all_asset_keys():
            schema = graph.get(key).metadata["dagster/column_schema"]
            if key.to_user_string() == "filter_classifiers":  # no label set here: checked in test_filters
                continue
            table = key.to_user_string()
            assert [c.name for c in schema.columns] == table_columns(con, table), key
            assert all(c.description for c in schema.columns), key
