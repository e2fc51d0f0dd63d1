"""The filter classifiers wired: labels from the CLI, a classifier per label set through the real
assets, filter:classifier removals, the next images to label, and a second round from the page's file."""

from __future__ import annotations

import json
from pathlib import Path

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from dedup_assets.cli import main as cli
from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.filters import filter_classifiers
from dedup_assets.defs.partitions import LABEL_SETS_PARTITIONS_NAME, SHARDS_PARTITIONS_NAME
from dedup_assets.settings import Settings
from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair
from dedup_assets.tables import write_labels
from dedup_assets.warehouse import Warehouse

CORPUS = ("clusterings", "candidate_pairs", "verified_pairs", "duplicate_groups", "filtered_dataset")


def _corpus(resources: dict, instance: DagsterInstance, label_sets: tuple[str, ...] = ("violence",)) -> None:
    for name in label_sets:  # one partition of label_sets per classifier
        assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[filter_classifiers], partition_key=name,
                           resources=resources, instance=instance).success
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() in CORPUS],
                       resources=resources, instance=instance).success


def _meta(instance: DagsterInstance, label_set: str) -> dict:
    from dagster import AssetRecordsFilter

    (rec,) = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("filter_classifiers"), asset_partitions=[label_set]), limit=1).records
    return {k: v.value for k, v in rec.asset_materialization.metadata.items()}


def _embedded(tmp_path: Path, instance: DagsterInstance, x: np.ndarray, caption: str,
              threshold: float = 0.999) -> tuple[list[str], Settings, dict]:
    """Vectors `x` as one external partition, through the per-shard assets: (image ids, settings, resources)."""
    meta = laion_metadata(len(x), 0, [f"{caption} {r}" for r in range(len(x))])
    write_clip_pair(tmp_path / "emb", 0, x, meta)
    settings = Settings(embeddings=str(tmp_path / "emb"), warehouse=str(tmp_path / "wh.duckdb"), threshold=threshold,
                        min_side=64)
    resources = build_resources(settings)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["emb_0"])
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key="emb_0",
                       resources=resources, instance=instance).success
    return [f"emb_0/{k}" for k in meta["key"].to_list()], settings, resources


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
    ids, settings, resources = _embedded(tmp_path, instance, x, "a calm scene with a table and a chair number")

    pos = [ids[i] for i in np.flatnonzero(is_bad)[:12]]
    neg = [ids[i] for i in np.flatnonzero(~is_bad)[:12]]
    wh_arg = ["--warehouse", settings.warehouse, "--dagster-home", str(tmp_path / "dagster_home")]
    assert cli(["label", "--set", "violence", "--positive", *pos, "--negative", *neg, *wh_arg]) == 0
    assert instance.get_dynamic_partitions(LABEL_SETS_PARTITIONS_NAME) == ["violence"]  # the set is a partition
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
    m1 = _meta(instance, "violence")
    assert m1["labels"] == 24 and m1["cv_recall"] >= 0.95 and m1["images_removed"] > 0
    assert m1["cv_brier"] < m1["cv_brier_uncalibrated"]  # the probabilities are calibrated, the raw scores are not
    probs = wh.query("SELECT min(probability) AS lo, max(probability) AS hi, count(*) AS n FROM classifier_scores")
    assert probs["n"][0] == n and 0 <= probs["lo"][0] < 0.5 < probs["hi"][0] <= 1
    queue = wh.read_table("label_queue")
    assert queue.height == 48 and not set(queue["image_id"].to_list()) & set(pos + neg)
    page = (tmp_path / "wh_files" / "labelling_violence.html").read_text(encoding="utf-8")
    assert page.count("data-label=1") == 48 and "dedup-assets label --set violence --from labels_violence.json" in page

    # a second round: the page's download (here written by hand with the true answers) is imported
    answers = [{"image_id": i, "label": bool(is_bad[ids.index(i)])} for i in queue["image_id"].to_list()]
    (tmp_path / "labels_violence.json").write_text(json.dumps(answers))
    assert cli(["label", "--set", "violence", "--from", str(tmp_path / "labels_violence.json"), *wh_arg]) == 0
    _corpus(resources, instance)
    m2 = _meta(instance, "violence")
    assert m2["labels"] == 24 + 48
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
    # the kept set carries them next to the caption; turned off, they are gone at the next pre-filter
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() in CORPUS],
                       resources=resources, instance=instance).success
    kept = Warehouse(settings.warehouse).query("SELECT caption_hypernymized FROM filtered_dataset")
    assert kept.height >= 2 and set(kept["caption_hypernymized"].to_list()) == set(hyp["caption_hypernymized"].to_list())
    resources["prefilters"] = PrefilterResource(min_side=64)
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key="emb_0",
                       resources=resources, instance=instance).success
    assert Warehouse(settings.warehouse).query("SELECT count(*) AS n FROM caption_hypernyms")["n"][0] == 0


def test_label_sets_are_partitions_that_combine_and_the_sensor_retrains_on_new_labels(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    from dagster import build_sensor_context

    from dedup_assets.defs.filters import label_sensor

    rng = np.random.default_rng(8)
    d, n = 16, 600
    kind = rng.integers(0, 3, n)  # 0: keep, 1: "violence", 2: "watermark"
    axes = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    x = rng.standard_normal((n, d)) + np.where(kind[:, None] == 1, 4.0 * axes[0], 0) + np.where(kind[:, None] == 2, 4.0 * axes[1], 0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids, settings, resources = _embedded(tmp_path, instance, x, "a quiet street with houses and trees, view")
    wh_arg = ["--warehouse", settings.warehouse, "--dagster-home", str(tmp_path / "dagster_home")]
    for name, k in (("violence", 1), ("watermark", 2)):
        pos = [ids[i] for i in np.flatnonzero(kind == k)[:16]]
        neg = [ids[i] for i in np.flatnonzero(kind != k)[:16]]
        assert cli(["label", "--set", name, "--positive", *pos, "--negative", *neg, *wh_arg]) == 0
    assert cli(["label", "--set", "scarce", "--positive", ids[0], ids[1], "--negative", ids[2], *wh_arg]) == 0
    wh = Warehouse(settings.warehouse)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for name in ("direct", "../escape"):  # written to `labels` without the CLI: not registered, one not a name
        write_labels(wh, pl.DataFrame({"image_id": [ids[3]], "label_set": [name], "label": [True],
                                       "source": ["sql"], "labelled_at": [now]}))

    def tick(cursor: str | None = None):  # noqa: ANN202
        return label_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                 resources={"warehouse": resources["warehouse"]}))

    first = tick()
    assert sorted(r.partition_key for r in first.run_requests) == ["direct", "scarce", "violence", "watermark"]
    (add,) = first.dynamic_partitions_requests  # `label` registered the others; "../escape" is refused
    assert add.partition_keys == ["direct"]
    assert not tick(first.cursor).run_requests  # no new labels, no new vectors: no retraining
    relabel = ids[int(np.flatnonzero(kind == 1)[0])]  # the same count of labels, one changed
    assert cli(["label", "--set", "violence", "--negative", relabel, *wh_arg]) == 0
    assert [r.partition_key for r in tick(first.cursor).run_requests] == ["violence"]
    assert cli(["label", "--set", "violence", "--positive", relabel, *wh_arg]) == 0
    instance.add_dynamic_partitions(LABEL_SETS_PARTITIONS_NAME, ["../escape"])  # as the UI lets anyone do
    with pytest.raises(Exception, match="use 1–64 letters"):  # a partition added by hand never names a path
        materialize(ALL_ASSETS + ALL_CHECKS, selection=[filter_classifiers], partition_key="../escape",
                    resources=resources, instance=instance)
    with wh.connect() as con:
        con.execute("DELETE FROM labels WHERE label_set IN ('direct', '../escape')")
    first = tick()

    _corpus(resources, instance, ("scarce", "violence", "watermark"))
    assert _meta(instance, "scarce")["status"].startswith("needs ≥ 4 labels of each kind")
    reasons = wh.query("SELECT reason, count(*) AS n FROM removed_images WHERE reason LIKE 'filter:classifier:%' "
                       "GROUP BY 1")
    removed = dict(zip(reasons["reason"].to_list(), reasons["n"].to_list()))
    assert set(removed) == {"filter:classifier:violence", "filter:classifier:watermark"}  # both sets remove
    gone = set(wh.query("SELECT image_id FROM removed_images WHERE reason LIKE 'filter:classifier:%'")["image_id"]
               .to_list())
    for k in (1, 2):
        target = {ids[i] for i in np.flatnonzero(kind == k)}
        assert len(gone & target) / len(target) >= 0.9
    assert wh.query("SELECT count(*) AS n FROM classifier_scores WHERE label_set = 'scarce'")["n"][0] == 0

    # new vectors arrive: filtered_dataset says which sets have not scored them, the sensor retrains every set
    extra = (x[:50] + 0.05 * rng.standard_normal((50, d))).astype(np.float32)
    write_clip_pair(tmp_path / "emb", 1, extra / np.linalg.norm(extra, axis=1, keepdims=True),
                    laion_metadata(50, 1, [f"a quiet street at dusk {r}" for r in range(50)]))
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["emb_1"])
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key="emb_1",
                       resources=resources, instance=instance).success
    assert sorted(r.partition_key for r in tick(first.cursor).run_requests) == ["scarce", "violence", "watermark"]
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() in CORPUS],
                       resources=resources, instance=instance).success
    from dedup_assets_tests.defs.wiring import latest_meta

    assert latest_meta(instance, "filtered_dataset")["classifier_unscored_images"] == {"violence": 50, "watermark": 50}
    # a set whose labels are gone removes nothing, whatever scores it left behind
    with wh.connect() as con:
        con.execute("DELETE FROM labels WHERE label_set = 'watermark'")
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() == "filtered_dataset"],
                       resources=resources, instance=instance).success
    assert wh.query("SELECT count(*) AS n FROM removed_images WHERE reason = 'filter:classifier:watermark'")["n"][0] == 0
    # the catalog's column schema is the table's
    from dedup_assets.definitions import build_definitions
    from dedup_assets.warehouse import table_columns

    spec = build_definitions(settings).resolve_asset_graph().get(AssetKey("filter_classifiers"))
    with wh.connect() as con:
        assert [c.name for c in spec.metadata["dagster/column_schema"].columns] == table_columns(con, "classifier_scores")
