"""The embed stage wired: vectors in the store, one model per warehouse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dagster import DagsterInstance, materialize

from dedup_assets.definitions import build_resources
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
