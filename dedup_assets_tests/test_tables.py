"""The table layer: the `embeddings` view over the store, the migration of a legacy FLOAT[d]
table, an empty store, and the one resolution of τ."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from dedup_assets.tables import (
    ThresholdRequiredError,
    delete_embeddings,
    embedding_store,
    embeddings_kind,
    ensure_embeddings,
    refresh_embeddings_view,
    resolve_threshold,
    write_embeddings,
)
from dedup_assets.warehouse import Warehouse, WarehouseError


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _legacy_table(wh: Warehouse, shards: dict[str, int], d: int = 8, model: str = "m-old") -> dict[str, np.ndarray]:
    """An `embeddings` table as the warehouse wrote it before the store: FLOAT[d] in DuckDB."""
    out = {}
    for i, (shard, n) in enumerate(shards.items()):
        x = _unit(n, d, seed=i)
        df = pl.DataFrame(
            {"image_id": [f"{shard}/{j:04d}" for j in range(n)], "shard": [shard] * n, "embedding": x,
             "model": [model] * n},
            schema={"image_id": pl.String, "shard": pl.String, "embedding": pl.Array(pl.Float32, d), "model": pl.String},
        )
        wh.replace_partition("embeddings", df, "shard", shard)
        out[shard] = x
    return out


def test_view_reads_the_store_like_the_old_table(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh.duckdb")
    x = _unit(50, 8, 1)
    ids = [f"a/{i:03d}" for i in range(50)]
    assert write_embeddings(wh, "a", [(ids[:20], x[:20]), (ids[20:], x[20:])], "m1", dim=8) == 50
    write_embeddings(wh, "b/odd key", [(["z"], _unit(1, 8, 2))], "m1", dim=8)
    assert embeddings_kind(wh) == "VIEW"
    got_ids, got = wh.read_vectors("embeddings", "image_id", "embedding")
    assert got_ids == sorted(ids + ["z"]) and got.shape == (51, 8)
    np.testing.assert_array_equal(got[: 50], x)
    with duckdb.connect(str(wh.path), read_only=True) as con:  # a user with plain duckdb
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'embeddings'").fetchall())
        shards = dict(con.execute("SELECT shard, count(*) FROM embeddings GROUP BY shard").fetchall())
    assert types == {"image_id": "VARCHAR", "shard": "VARCHAR", "embedding": "FLOAT[8]", "model": "VARCHAR"}
    assert shards == {"a": 50, "b/odd key": 1}
    delete_embeddings(wh, "a")
    assert wh.query("SELECT count(*) AS n FROM embeddings")["n"][0] == 1


def test_empty_store_gives_an_empty_typed_view(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh.duckdb")
    ensure_embeddings(wh)
    assert embeddings_kind(wh) == "VIEW"
    assert wh.query("SELECT count(*) AS n, count(DISTINCT model) AS m FROM embeddings").row(0) == (0, 0)
    assert wh.read_vectors("embeddings", "image_id", "embedding")[0] == []
    # the unit-norm check's query and a join still work on zero rows
    wh.query("SELECT max(abs(sqrt(list_dot_product(embedding::FLOAT[], embedding::FLOAT[])) - 1)) FROM embeddings")
    write_embeddings(wh, "a", [(["x"], _unit(1, 4, 0))], "m", dim=4)
    delete_embeddings(wh, "a")  # back to no file at all: the view must not break
    assert wh.query("SELECT count(*) AS n FROM embeddings")["n"][0] == 0


def test_legacy_table_is_migrated_per_shard_then_dropped(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh.duckdb")
    legacy = _legacy_table(wh, {"s0": 30, "s1": 12})
    assert embeddings_kind(wh) == "BASE TABLE"
    before_ids, before = wh.read_vectors("embeddings", "image_id", "embedding")
    with pytest.raises(WarehouseError, match="ensure_embeddings"):
        refresh_embeddings_view(wh)  # nothing replaces the old table silently
    lines: list[str] = []
    store = ensure_embeddings(wh, log=lines.append)
    assert embeddings_kind(wh) == "VIEW"
    assert store.partitions() == ["s0", "s1"] and store.counts() == {"s0": 30, "s1": 12}
    assert store.models() == {"m-old"}
    np.testing.assert_array_equal(store.read_partition("s1")[1], legacy["s1"])
    after_ids, after = wh.read_vectors("embeddings", "image_id", "embedding")
    assert after_ids == before_ids
    np.testing.assert_array_equal(after, before)
    assert any("migrated the embeddings table (42 vectors, 2 shards)" in line for line in lines)
    ensure_embeddings(wh)  # idempotent
    assert embedding_store(wh).count() == 42


def test_legacy_table_mixing_models_in_a_shard_is_refused(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh.duckdb")
    _legacy_table(wh, {"s0": 5})
    with wh.connect() as con:
        con.execute("UPDATE embeddings SET model = 'other' WHERE image_id = 's0/0001'")
    with pytest.raises(WarehouseError, match=r"mix models; re-embed them \(DROP TABLE embeddings"):
        ensure_embeddings(wh)
    assert embeddings_kind(wh) == "BASE TABLE"  # left as it was
    assert embedding_store(wh).partitions() == []


@dataclass
class _Emb:
    threshold: float | None
    calibrated: float | None

    def calibrated_threshold(self) -> float | None:
        return self.calibrated


def test_threshold_resolution_order() -> None:
    assert resolve_threshold(0.8, _Emb(0.85, 0.9)) == 0.8  # the asset's own override
    assert resolve_threshold(None, _Emb(0.85, 0.9)) == 0.85  # --threshold
    assert resolve_threshold(None, _Emb(None, 0.9)) == 0.9  # the embedder's calibration
    assert resolve_threshold(None, _Emb(0.85, None)) == 0.85
    with pytest.raises(ThresholdRequiredError, match="pass --threshold"):
        resolve_threshold(None, _Emb(None, None))  # external vectors, nothing given
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        resolve_threshold(None, _Emb(1.5, 0.9))


def test_other_dimension_is_refused_and_a_moved_warehouse_is_repointed(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "a" / "wh.duckdb")
    write_embeddings(wh, "p", [(["x", "y"], _unit(2, 8, 0))], "m", dim=8)
    with pytest.raises(WarehouseError, match="has 16-d vectors but the store holds 8-d"):
        write_embeddings(wh, "q", [(["z"], _unit(1, 16, 0))], "m", dim=16)
    assert embedding_store(wh).partitions() == ["p"]
    write_embeddings(wh, "p", [(["x"], _unit(1, 16, 0))], "m", dim=16)  # the only partition: d may change
    assert wh.query("SELECT count(*) AS n FROM embeddings")["n"][0] == 1
    # move the warehouse with its files: the view is re-pointed on the next access
    (tmp_path / "a").rename(tmp_path / "b")
    moved = Warehouse(tmp_path / "b" / "wh.duckdb")
    ensure_embeddings(moved)
    assert moved.read_vectors("embeddings", "image_id", "embedding")[1].shape == (1, 16)


def test_candidate_pairs_merge_in_passes_equals_one_union(tmp_path: Path) -> None:
    """merge_candidate_pairs unions the bucket files in hash passes; any number of passes gives the
    same rows: one per pair, the largest similarity, found_by ORed."""
    import zlib

    from dedup_assets.tables import PAIR_HASH_CLASSES, merge_candidate_pairs

    rng = np.random.default_rng(3)
    files, want = [], {}
    for b in range(4):
        a = rng.integers(0, 60, 300)
        c = rng.integers(0, 60, 300)
        keep = a != c
        lo = [f"s/{min(x, y):03d}" for x, y in zip(a[keep], c[keep])]
        hi = [f"s/{max(x, y):03d}" for x, y in zip(a[keep], c[keep])]
        sim = rng.uniform(0.9, 1.0, int(keep.sum())).astype(np.float32)
        fb = rng.integers(1, 32, int(keep.sum())).astype(np.uint8)
        for k in zip(lo, hi, sim.tolist(), fb.tolist()):
            s0, f0 = want.get(k[:2], (0.0, 0))
            want[k[:2]] = (max(s0, k[2]), f0 | k[3])
        p = tmp_path / f"bucket_{b}.parquet"
        h = [zlib.crc32(x.encode()) % PAIR_HASH_CLASSES for x in lo]  # any function of image_a will do
        pl.DataFrame({"image_a": lo, "image_b": hi, "similarity": sim, "found_by": fb,
                      "shard_a": ["s"] * len(lo), "shard_b": ["s"] * len(lo), "h": h},
                     schema_overrides={"h": pl.UInt16}).sort("h").write_parquet(p, row_group_size=16)
        files.append(p)
    for rows_per_pass in (10**9, 250, 37):  # 1, 5 and 33 passes
        wh = Warehouse(tmp_path / f"w{rows_per_pass}.duckdb")
        assert merge_candidate_pairs(wh, files, rows_per_pass=rows_per_pass) == len(want)
        got = {(a, b): (s, f) for a, b, s, f in wh.read_table("candidate_pairs").iter_rows()}
        assert got.keys() == want.keys()
        assert all(abs(got[k][0] - want[k][0]) < 1e-6 and got[k][1] == want[k][1] for k in want)
    assert merge_candidate_pairs(Warehouse(tmp_path / "empty.duckdb"), []) == 0


def test_classifier_tables_of_the_previous_version_are_migrated_keeping_other_sets(tmp_path: Path) -> None:
    from dedup_assets.tables import CLASSIFIER_SCORES_SCHEMA, LABEL_QUEUE_SCHEMA, replace_classifier_scores
    from dedup_assets.warehouse import table_columns

    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.connect() as con:  # as the version before calibration wrote them (one table for all sets)
        con.execute("CREATE TABLE classifier_scores AS SELECT * FROM (VALUES ('s/1', 'old', 2.0, true), "
                    "('s/2', 'old', -1.0, false)) t(image_id, label_set, score, remove)")
        con.execute("CREATE TABLE label_queue AS SELECT * FROM (VALUES ('old', 1, 's/3', 0.1)) "
                    "t(label_set, rank, image_id, score)")
    part = tmp_path / "part.parquet"
    pl.DataFrame({"image_id": ["s/1", "s/2"], "label_set": ["new"] * 2, "score": [0.5, -0.5],
                  "probability": [0.6, 0.4], "remove": [True, False]}).write_parquet(part)
    queue = pl.DataFrame({"label_set": ["new"], "rank": [1], "image_id": ["s/4"], "score": [0.01]})
    assert replace_classifier_scores(wh, "new", [part], queue) == 1
    with wh.connect() as con:
        assert table_columns(con, "classifier_scores") == list(CLASSIFIER_SCORES_SCHEMA)  # catalog order
        assert table_columns(con, "label_queue") == list(LABEL_QUEUE_SCHEMA)
    scores = wh.query("SELECT * FROM classifier_scores ORDER BY label_set, image_id")
    assert scores.rows() == [("s/1", "new", 0.5, 0.6, True), ("s/2", "new", -0.5, 0.4, False),
                             ("s/1", "old", 2.0, None, True), ("s/2", "old", -1.0, None, False)]
    assert wh.query("SELECT label_set, image_id FROM label_queue ORDER BY 1").rows() == [("new", "s/4"), ("old", "s/3")]
    assert replace_classifier_scores(wh, "new", [], queue.clear()) == 0  # too few labels now: the set's rows go
    assert wh.query("SELECT DISTINCT label_set FROM classifier_scores").rows() == [("old",)]
