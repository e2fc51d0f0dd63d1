"""The filter classifiers wired: labels from the CLI, a classifier per label set through the real
assets, filter:classifier removals, the next images to label, and a second round from the page's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from dagster import AssetKey, DagsterInstance, materialize

from dedup_assets.cli import main as cli
from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.settings import Settings
from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair
from dedup_assets.warehouse import Warehouse

CORPUS = ("clusterings", "candidate_pairs", "verified_pairs", "duplicate_groups", "filter_classifiers",
          "filtered_dataset")


def _corpus(resources: dict, instance: DagsterInstance) -> None:
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() in CORPUS],
                       resources=resources, instance=instance).success


def test_a_classifier_from_a_few_labels_removes_its_category_and_asks_for_more(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    rng = np.random.default_rng(5)
    d, n = 24, 1200
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    is_bad = rng.random(n) < 0.2  # the category to remove ("violence")
    x = rng.standard_normal((n, d)) + np.where(is_bad[:, None], 3.0 * direction, 0.0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    meta = laion_metadata(n, 0, [f"a calm scene with a table and a chair number {r}" for r in range(n)])
    write_clip_pair(tmp_path / "emb", 0, x, meta)
    ids = [f"emb_0/{k}" for k in meta["key"].to_list()]
    settings = Settings(embeddings=str(tmp_path / "emb"), warehouse=str(tmp_path / "wh.duckdb"), threshold=0.999,
                        min_side=64)
    resources = build_resources(settings)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["emb_0"])
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key="emb_0",
                       resources=resources, instance=instance).success

    pos = [ids[i] for i in np.flatnonzero(is_bad)[:12]]
    neg = [ids[i] for i in np.flatnonzero(~is_bad)[:12]]
    wh_arg = ["--warehouse", settings.warehouse]
    assert cli(["label", "--set", "violence", "--positive", *pos, "--negative", *neg, *wh_arg]) == 0
    assert cli(["label", "--set", "violence", "--positive", "emb_0/nope", *wh_arg]) == 2  # unknown ids: nothing written
    assert cli(["label", "--set", "bad name!", "--positive", pos[0], *wh_arg]) == 2
    _corpus(resources, instance)

    wh = Warehouse(settings.warehouse)
    bad = {ids[i] for i in np.flatnonzero(is_bad)}

    def scored(labelled: set[str]) -> tuple[float, float]:  # recall and precision on the images nobody labelled
        gone = set(wh.query("SELECT image_id FROM removed_images WHERE reason = 'filter:classifier:violence'")
                   ["image_id"].to_list()) - labelled
        target = bad - labelled
        return len(gone & target) / len(target), len(gone & target) / max(len(gone), 1)

    r1, p1 = scored(set(pos + neg))
    assert r1 >= 0.9 and p1 > 0.2  # 24 labels: biased toward removal (recall first), precision modest
    m1 = instance.get_latest_materialization_event(AssetKey("filter_classifiers")).asset_materialization.metadata
    assert m1["violence_labels"].value == 24 and m1["violence_cv_recall"].value >= 0.95
    queue = wh.read_table("label_queue")
    assert queue.height == 48 and not set(queue["image_id"].to_list()) & set(pos + neg)
    page = (tmp_path / "wh_files" / "labelling_violence.html").read_text(encoding="utf-8")
    assert page.count("data-label=1") == 48 and "dedup-assets label --set violence --from labels_violence.json" in page

    # a second round: the page's download (here written by hand with the true answers) is imported
    answers = [{"image_id": i, "label": bool(is_bad[ids.index(i)])} for i in queue["image_id"].to_list()]
    (tmp_path / "labels_violence.json").write_text(json.dumps(answers))
    assert cli(["label", "--set", "violence", "--from", str(tmp_path / "labels_violence.json"), *wh_arg]) == 0
    _corpus(resources, instance)
    m2 = instance.get_latest_materialization_event(AssetKey("filter_classifiers")).asset_materialization.metadata
    assert m2["violence_labels"].value == 24 + 48
    r2, p2 = scored(set(pos + neg) | {a["image_id"] for a in answers})
    assert r2 >= 0.9 and p2 > p1 + 0.1, (r1, p1, r2, p2)  # the labels the queue asked for paid off
    labels = wh.read_table("labels")
    assert labels.height == 72 and labels.filter(pl.col("source") == "cli").height == 72
    accounting = wh.query("SELECT (SELECT count(*) FROM filtered_dataset) + (SELECT count(*) FROM removed_images) AS n")
    assert accounting["n"][0] == n


def test_prefilter_writes_hypernymized_captions_when_asked(tmp_path: Path, instance: DagsterInstance) -> None:
    from dedup_assets.defs.filters import PrefilterResource

    captions = ["a photo of John Smith walking in Chicago", "a red bicycle against a wall"] * 10
    write_clip_pair(tmp_path / "emb", 0, np.eye(20, 8, dtype=np.float32) + 0.01, laion_metadata(20, 0, captions))
    settings = Settings(embeddings=str(tmp_path / "emb"), warehouse=str(tmp_path / "wh.duckdb"), threshold=0.99,
                        min_side=64)
    resources = build_resources(settings)
    resources["prefilters"] = PrefilterResource(min_side=64, hypernymize=True)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["emb_0"])
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key="emb_0",
                       resources=resources, instance=instance).success
    hyp = Warehouse(settings.warehouse).query("SELECT * FROM caption_hypernyms ORDER BY image_id")
    assert hyp.height == 20 and hyp["replacements"].sum() == 20
    assert set(hyp["caption_hypernymized"].to_list()) == {"a photo of person walking in city", "a red bicycle against a wall"}
    meta = instance.get_latest_materialization_event(AssetKey("prefilter")).asset_materialization.metadata
    assert meta["names_replaced_by_hypernyms"].value == 20
