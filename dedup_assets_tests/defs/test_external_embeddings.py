"""Bring-your-own embeddings: the clip-retrieval layout through the real per-partition assets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, build_sensor_context, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, PER_SHARD_ASSETS, build_resources
from dedup_assets.defs.ingest import shard_sensor
from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.ingest.clip_retrieval import EmbeddingsInputError, discover_parts, validate_parts
from dedup_assets.settings import Settings
from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair
from dedup_assets.tables import embedding_store
from dedup_assets.warehouse import Warehouse

D = 24


def _vectors(n: int, seed: int, dtype=np.float32) -> np.ndarray:  # noqa: ANN001
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _settings(root: Path, tmp_path: Path) -> Settings:
    return Settings(embeddings=str(root), warehouse=str(tmp_path / "wh.duckdb"), threshold=0.9, min_side=64)


def _run(settings: Settings, instance: DagsterInstance, keys: list[str]):  # noqa: ANN202
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [k for k in keys if not instance.has_dynamic_partition(SHARDS_PARTITIONS_NAME, k)])
    resources = build_resources(settings)
    return [
        materialize(ALL_ASSETS + ALL_CHECKS, selection=PER_SHARD_ASSETS, partition_key=k, resources=resources,
                    instance=instance, raise_on_error=False)
        for k in keys
    ]


def _errors(result) -> list[str]:  # noqa: ANN001
    out = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            while err.cause is not None:
                err = err.cause
            out.append(err.message)
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_import_through_the_assets(dtype, tmp_path: Path, instance: DagsterInstance) -> None:  # noqa: ANN001
    root = tmp_path / "emb"
    x0, x1 = _vectors(40, 0, dtype), _vectors(25, 1, dtype)
    x1 = (x1.astype(np.float32) * 3.0).astype(dtype)  # not unit norm: normalized on the way in
    bad = x0.copy()
    bad[3] = np.nan
    bad[9] = 0
    write_clip_pair(root, 0, bad, laion_metadata(40, 0))
    write_clip_pair(root, 1, x1, laion_metadata(25, 1))
    settings = _settings(root, tmp_path)
    results = _run(settings, instance, ["emb_0", "emb_1"])
    assert all(r.success for r in results), [_errors(r) for r in results]
    wh = Warehouse(settings.warehouse)

    index = wh.read_table("image_index", order_by="image_id")
    assert index.height == 65 and set(index["shard"]) == {"emb_0", "emb_1"}
    row = index.filter(pl.col("image_id") == "emb_0/0000001").row(0, named=True)
    assert row["key"] == "0000001" and row["caption"] == "a photo of a red chair number 1"
    assert row["url"] == "https://example.com/0000001.jpg" and row["location"] == "/images/0/0000001.jpg"
    assert set(json.loads(row["metadata"])) == {"similarity", "LICENSE"}
    assert row["status"] == "ok" and row["width"] is None and row["format"] is None
    statuses = dict(zip(index["image_id"], zip(index["status"], index["error"])))
    assert statuses["emb_0/0000003"] == ("bad_embedding", "non_finite")
    assert statuses["emb_0/0000009"] == ("bad_embedding", "zero_vector")

    store = embedding_store(wh)
    assert store.partitions() == ["emb_0", "emb_1"] and store.models() == {"external"} and store.dim() == D
    ids, got = store.read_partition("emb_0")
    assert len(ids) == 38 and "emb_0/0000003" not in ids and "emb_0/0000009" not in ids
    ref = bad.astype(np.float32)[[i for i in range(40) if i not in (3, 9)]]
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    ids1, got1 = store.read_partition("emb_1")
    assert ids1 == [f"emb_1/1{r:06d}" for r in range(25)]
    np.testing.assert_allclose(np.linalg.norm(got1, axis=1), 1.0, atol=1e-5)
    assert wh.query("SELECT count(*) AS n FROM embeddings")["n"][0] == 63  # the DuckDB view

    pre = wh.read_table("prefilter")
    assert pre.height == 65
    reasons = dict(zip(pre["image_id"], pre["reasons"].to_list()))
    assert reasons["emb_0/0000003"] == ["decode:bad_embedding"]
    assert pre.filter(pl.col("passed")).height == 63  # no image-only rule fails a row without image data
    meta = instance.get_latest_materialization_event(
        next(a for a in PER_SHARD_ASSETS if a.key.path == ["prefilter"]).key
    ).asset_materialization.metadata
    assert meta["image_rules_skipped_no_image_data"].value == 25  # the emb_1 run
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for r in results
              for e in r.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks == {"image_index_ids_unique": True, "embeddings_unit_norm_one_model": True}


def test_size_rules_apply_when_the_metadata_has_width_and_height(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    meta = laion_metadata(3, 0).with_columns(width=pl.Series([640, 20, 900]), height=pl.Series([480, 20, 300]))
    write_clip_pair(root, 0, _vectors(3, 0), meta)
    assert all(r.success for r in _run(_settings(root, tmp_path), instance, ["emb_0"]))
    pre = Warehouse(tmp_path / "wh.duckdb").read_table("prefilter", order_by="image_id")
    assert pre["reasons"].to_list() == [[], ["min_side"], ["aspect_ratio"]]


def test_key_falls_back_to_image_path_stem_and_repeated_keys_are_recorded(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    meta = pl.DataFrame({"image_path": ["/x/cat.jpg", "/y/dog.png", "/z/cat.jpg"], "caption": ["a cat on a mat"] * 3})
    write_clip_pair(root, 0, _vectors(3, 0), meta)
    assert all(r.success for r in _run(_settings(root, tmp_path), instance, ["emb_0"]))
    wh = Warehouse(tmp_path / "wh.duckdb")
    index = wh.read_table("image_index", order_by="image_id")
    assert index.select("image_id", "key", "status").rows() == [
        ("emb_0/cat", "cat", "ok"), ("emb_0/cat#2", "cat", "duplicate_key"), ("emb_0/dog", "dog", "ok")
    ]
    assert embedding_store(wh).read_partition("emb_0")[0] == ["emb_0/cat", "emb_0/dog"]


def test_row_count_mismatch_names_both_files(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    write_clip_pair(root, 0, _vectors(10, 0), laion_metadata(9, 0))
    (result,) = _run(_settings(root, tmp_path), instance, ["emb_0"])
    assert not result.success
    msg = " ".join(_errors(result))
    assert "img_emb_0.npy has 10 rows" in msg and "metadata_0.parquet has 9" in msg


def test_dimension_mismatch_between_files_names_the_file(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    write_clip_pair(root, 0, _vectors(5, 0), laion_metadata(5, 0))
    write_clip_pair(root, 1, np.ones((5, D + 8), np.float32), laion_metadata(5, 1))
    with pytest.raises(EmbeddingsInputError, match=r"img_emb_1\.npy has dimension 32 but .*img_emb_0\.npy has 24"):
        validate_parts(discover_parts(root))
    (result,) = _run(_settings(root, tmp_path), instance, ["emb_0"])
    assert not result.success and any("img_emb_1.npy has dimension 32" in m for m in _errors(result))


def test_missing_metadata_and_unreadable_npy_are_named(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    write_clip_pair(root, 0, _vectors(5, 0), laion_metadata(5, 0))
    np.save(root / "img_emb" / "img_emb_1.npy", _vectors(5, 1))
    with pytest.raises(EmbeddingsInputError, match=r"metadata/metadata_1\.parquet: missing"):
        discover_parts(root)
    laion_metadata(5, 1).write_parquet(root / "metadata" / "metadata_1.parquet")
    (root / "img_emb" / "img_emb_1.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(EmbeddingsInputError, match=r"img_emb_1\.npy: cannot be read as a \.npy array"):
        validate_parts(discover_parts(root))
    np.save(root / "img_emb" / "img_emb_1.npy", np.arange(5))
    with pytest.raises(EmbeddingsInputError, match=r"img_emb_1\.npy: expected an N×d array"):
        validate_parts(discover_parts(root))
    with pytest.raises(EmbeddingsInputError, match="no such folder"):
        discover_parts(tmp_path / "nowhere")


def test_sensor_adds_one_partition_per_file_pair(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    for i in (0, 2, 10):
        write_clip_pair(root, i, _vectors(2, i), laion_metadata(2, i))
    resources = build_resources(_settings(root, tmp_path))
    ctx = build_sensor_context(instance=instance, resources={"dataset": resources["dataset"]})
    result = shard_sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == ["emb_0", "emb_2", "emb_10"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["emb_0", "emb_2", "emb_10"]


def test_another_model_id_is_refused_not_mixed(tmp_path: Path, instance: DagsterInstance) -> None:
    root = tmp_path / "emb"
    for i in (0, 1):
        write_clip_pair(root, i, _vectors(4, i), laion_metadata(4, i))
    settings = _settings(root, tmp_path)
    assert _run(settings, instance, ["emb_0"])[0].success
    other = Settings(**{**settings.__dict__, "model_id": "clip-other"})
    (result,) = _run(other, instance, ["emb_1"])
    assert not result.success and any("cannot be compared" in m for m in _errors(result))
    assert embedding_store(Warehouse(settings.warehouse)).partition_models() == {"emb_0": "external"}


def test_legacy_embeddings_table_is_migrated_by_the_asset(tmp_path: Path, instance: DagsterInstance) -> None:
    """A warehouse written before the store (FLOAT[d] table) is migrated when `embeddings` runs."""
    root = tmp_path / "emb"
    write_clip_pair(root, 0, _vectors(6, 0), laion_metadata(6, 0))
    settings = _settings(root, tmp_path)
    wh = Warehouse(settings.warehouse)
    old = _vectors(3, 9)
    wh.replace_partition("embeddings", pl.DataFrame(
        {"image_id": ["emb_9/a", "emb_9/b", "emb_9/c"], "shard": ["emb_9"] * 3, "embedding": old,
         "model": ["external"] * 3},
        schema={"image_id": pl.String, "shard": pl.String, "embedding": pl.Array(pl.Float32, D), "model": pl.String},
    ), "shard", "emb_9")
    (result,) = _run(settings, instance, ["emb_0"])
    assert result.success, _errors(result)
    store = embedding_store(wh)
    assert store.counts() == {"emb_0": 6, "emb_9": 3}
    np.testing.assert_array_equal(store.read_partition("emb_9")[1], old)
    kind = wh.query("SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'")
    assert kind["table_type"].to_list() == ["VIEW"]
    assert wh.query("SELECT shard, count(*) AS n FROM embeddings GROUP BY shard ORDER BY shard").rows() == [
        ("emb_0", 6), ("emb_9", 3)]
