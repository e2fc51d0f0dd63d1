"""The embed stage wired: vectors in the store, one model per warehouse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, materialize

from dedup_assets.definitions import PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.embed import embeddings
from dedup_assets.defs.ingest import image_index
from dedup_assets.tables import embedding_store, embeddings_kind
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.defs.wiring import materialize_shards, small_settings


def test_embeddings_vectors_read_back(small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance) -> None:
    settings = small_settings(small_dataset, tmp_path)
    materialize_shards(small_dataset, settings, instance, [image_index, embeddings])
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


def test_changing_the_embedder_fails_instead_of_mixing_models(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance
) -> None:
    settings = small_settings(small_dataset, tmp_path)
    materialize_shards(small_dataset, settings, instance, [image_index, embeddings])
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


TINY = "dedup-assets-wiring-tiny-vit"  # an open_clip config registered in this process only


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dedup_assets_tests.openclip_helpers import register_tiny_clip

    return register_tiny_clip(tmp_path_factory.mktemp("cfg"), TINY)


def test_clip_score_filter_removes_images_below_the_threshold(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance, tiny_clip: str
) -> None:
    from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS
    from dedup_assets.defs.curate import CurateResource
    from dedup_assets.defs.resources import EmbedderResource

    settings = small_settings(small_dataset, tmp_path)
    resources = build_resources(settings)
    resources["embedder"] = EmbedderResource(kind="openclip", model=tiny_clip, allow_random_weights=True, device="cpu",
                                             workers=0, clip_score=True, threshold=0.99)
    materialize_shards(small_dataset, settings, instance, PER_SHARD_ASSETS, resources=resources)
    wh = Warehouse(settings.warehouse)
    scores = wh.read_table("clip_scores")
    assert scores.height == wh.query("SELECT count(*) AS n FROM embeddings")["n"][0] > 0
    assert scores["clip_score"].is_between(-1.0, 1.0).all() and scores["model"].n_unique() == 1
    cut = float(scores["clip_score"].median())  # random weights: the scores mean nothing, the plumbing does
    resources["curate"] = CurateResource(min_clip_score=cut)
    corpus = ["clusterings", "candidate_pairs", "verified_pairs", "duplicate_groups", "filtered_dataset"]
    result = materialize(ALL_ASSETS + ALL_CHECKS, selection=[a for a in ALL_ASSETS if a.key.to_user_string() in corpus],
                         resources=resources, instance=instance)
    assert result.success
    kept = wh.query("SELECT f.image_id, s.clip_score FROM filtered_dataset f JOIN clip_scores s USING (image_id)")
    assert kept.height == wh.read_table("filtered_dataset").height and (kept["clip_score"] >= cut).all()
    removed = wh.query("SELECT r.reason, r.detail, s.clip_score FROM removed_images r JOIN clip_scores s USING (image_id) "
                       "WHERE r.reason = 'filter:clip_score'")
    assert removed.height > 0 and (removed["clip_score"] < cut).all()
    assert removed["detail"].str.starts_with("clip_score=").all()


def test_clip_score_is_unavailable_without_a_text_tower(small_dataset: SmallDataset, tmp_path: Path) -> None:
    from dedup_assets.settings import Settings

    with pytest.raises(ValueError, match="needs --embedder openclip"):
        Settings(source=str(small_dataset.root), warehouse=str(tmp_path / "w.duckdb"), min_clip_score=0.28)
