"""The curate stage wired: the seed's classifier reweighting through the real assets, on vectors whose
filter removes cats more than dogs (bad captions on 80 % of cats, 20 % of dogs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dagster import AssetKey, DagsterInstance, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, CORPUS_ASSETS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.curate import CurateResource
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.settings import Settings
from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair
from dedup_assets.warehouse import Warehouse


def test_classifier_weights_restore_the_share_the_filter_removed(tmp_path: Path, instance: DagsterInstance) -> None:
    rng = np.random.default_rng(0)
    d, n = 16, 1500
    cat, dog = rng.standard_normal(d), rng.standard_normal(d)
    root = tmp_path / "emb"
    is_cat_by_key = {}
    for part in range(2):
        is_cat = rng.random(n) < 0.5
        x = np.where(is_cat[:, None], cat, dog) + 0.8 * rng.standard_normal((n, d))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        bad = np.where(is_cat, rng.random(n) < 0.8, rng.random(n) < 0.2)
        captions = ["#cute #pet #instagood #photooftheday" if b else f"a calm animal resting on a sofa number {r}"
                    for r, b in enumerate(bad)]
        meta = laion_metadata(n, part, captions)
        write_clip_pair(root, part, x, meta)
        is_cat_by_key.update(dict(zip(meta["key"].to_list(), is_cat.tolist())))
    settings = Settings(embeddings=str(root), warehouse=str(tmp_path / "wh.duckdb"), threshold=0.995, min_side=64)
    resources = build_resources(settings)
    resources["curate"] = CurateResource(reweight_method="classifier", reweight_sample=3000)
    keys = ["emb_0", "emb_1"]
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, keys)
    for k in keys:
        assert materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key=k,
                           resources=resources, instance=instance).success
    assert materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in CORPUS_ASSETS if a.key.to_user_string() in
                       ("clusterings", "candidate_pairs", "verified_pairs", "duplicate_groups", "filtered_dataset")],
                       resources=resources, instance=instance).success

    kept = Warehouse(settings.warehouse).query("SELECT key, weight FROM filtered_dataset")
    cats = np.array([is_cat_by_key[k] for k in kept["key"].to_list()])
    w = kept["weight"].to_numpy()
    assert abs(w.mean() - 1.0) < 1e-9 and w.min() >= 0.1 - 1e-9
    assert cats.mean() < 0.3  # the filter kept far fewer cats
    assert abs((w * cats).sum() / w.sum() - 0.5) < 0.1  # the weights give them back their share
    meta = instance.get_latest_materialization_event(AssetKey("filtered_dataset")).asset_materialization.metadata
    assert meta["reweight_method"].value == "classifier"
    assert meta["classifier_auc_unweighted"].value > 0.6 and abs(meta["classifier_auc_weighted"].value - 0.5) < 0.06
    assert (tmp_path / "wh_files" / "filtered_dataset.parquet").exists()
    assert not list((tmp_path / "wh_files" / "reweight").glob("part_*"))
