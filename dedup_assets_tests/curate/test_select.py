"""Known-answer tests for the kept/removed split (SQL in the table layer) and its accounting check,
on a real DuckDB warehouse under tmp_path."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dedup_assets import tables
from dedup_assets.curate.reweight import ReweightConfig, cluster_weights
from dedup_assets.tables import KEPT_SCHEMA, REMOVED_SCHEMA, SelectionError, build_filtered_dataset, read_accounting
from dedup_assets.warehouse import Warehouse


def _index() -> pl.DataFrame:
    rows = [
        # image_id, status, error
        ("s0/a", "ok", None),  # keeper of g1, passes → kept
        ("s0/b", "ok", None),  # duplicate of a
        ("s0/c", "truncated", "image file is truncated"),  # fails decode AND the filter AND is grouped
        ("s0/d", "ok", None),  # fails a filter and is a duplicate: the filter wins
        ("s1/e", "ok", None),  # keeper of g2 that fails a filter
        ("s1/f", "ok", None),  # duplicate of e: still points at e
        ("s1/g", "ok", None),  # passes, unique, but has no embedding
        ("s1/h", "ok", None),  # absent from the prefilter table: counts as passed
        ("s1/i", "not_an_image", "cannot identify image file"),
    ]
    return pl.DataFrame(
        {
            "image_id": [r[0] for r in rows],
            "shard": [r[0].split("/")[0] for r in rows],
            "key": [r[0].split("/")[1] for r in rows],
            "location": [f"/data/{r[0]}.jpg" for r in rows],
            "caption": [f"caption of {r[0]}" for r in rows],
            "url": [None] * len(rows),
            "bytes": [1000] * len(rows),
            "width": [64] * len(rows),
            "height": [48] * len(rows),
            "status": [r[1] for r in rows],
            "error": [r[2] for r in rows],
        },
        schema_overrides={"url": pl.String, "width": pl.Int64, "height": pl.Int64},
    )


def _prefilter() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": ["s0/a", "s0/b", "s0/c", "s0/d", "s1/e", "s1/f", "s1/g", "s1/i"],
            "shard": ["s0"] * 4 + ["s1"] * 4,
            "passed": [True, True, False, False, False, True, True, False],
            "reasons": [[], [], ["decode:truncated"], ["min_side", "caption_hashtags"], ["caption_hashtags"], [], [],
                        ["decode:not_an_image"]],
        }
    )


def _groups() -> pl.DataFrame:
    # Group labels deliberately differ from the keeper ids: the keeper is found through is_keeper.
    return pl.DataFrame(
        {
            "image_id": ["s0/a", "s0/b", "s0/c", "s1/e", "s1/f", "s0/d"],
            "group_id": ["g1", "g1", "g1", "g2", "g2", "g2"],
            "is_keeper": [True, False, False, True, False, False],
            "similarity_to_keeper": [1.0, 0.97, 0.95, 1.0, 0.9312, 0.96],
        },
        schema_overrides={"similarity_to_keeper": pl.Float32},
    )


EMBEDDED = ["s0/a", "s0/b", "s0/d", "s1/e", "s1/f", "s1/h"]


def _warehouse(tmp_path: Path, prefilter: bool = True, groups: pl.DataFrame | None | bool = True,
               embedded: bool = True, index: pl.DataFrame | None = None) -> Warehouse:
    wh = Warehouse(tmp_path / "wh.duckdb")
    wh.replace_table("image_index", _index() if index is None else index)
    if prefilter:
        wh.replace_table("prefilter", _prefilter())
    if groups is True:
        groups = _groups()
    if isinstance(groups, pl.DataFrame):
        wh.replace_table("duplicate_groups", groups)
    if embedded:  # a plain table standing in for the store's view: only its ids are read
        wh.replace_table("embeddings", pl.DataFrame({"image_id": EMBEDDED}))
    return wh


def _build(wh: Warehouse, tmp_path: Path) -> dict:
    cfg = ReweightConfig()
    return build_filtered_dataset(wh, 0, lambda c: cluster_weights(c, cfg), tmp_path / "out" / "filtered_dataset.parquet")


def _tables(wh: Warehouse) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (wh.read_table("filtered_dataset", order_by="image_id"), wh.read_table("removed_images", order_by="image_id"))


def test_reasons_follow_precedence_and_account_for_every_file(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path)
    built = _build(wh, tmp_path)
    kept, removed = _tables(wh)

    assert kept["image_id"].to_list() == ["s0/a", "s1/h"]
    reasons = dict(zip(removed["image_id"].to_list(), removed["reason"].to_list()))
    details = dict(zip(removed["image_id"].to_list(), removed["detail"].to_list()))
    assert reasons == {
        "s0/b": "duplicate_of:s0/a",
        "s0/c": "decode:truncated",  # decode beats filter and duplicate
        "s0/d": "filter:min_side",  # filter beats duplicate; first reason named
        "s1/e": "filter:caption_hashtags",  # a keeper that fails a filter goes by the filter …
        "s1/f": "duplicate_of:s1/e",  # … and its duplicates still point at it
        "s1/g": "no_embedding:not_embedded",
        "s1/i": "decode:not_an_image",
    }
    assert details["s0/b"] == "similarity=0.97"
    assert details["s1/f"] == "similarity=0.9312"
    assert details["s0/d"] == "min_side,caption_hashtags"
    assert details["s0/c"] == "image file is truncated"

    assert kept.schema == pl.Schema(KEPT_SCHEMA)
    assert removed.schema == pl.Schema(REMOVED_SCHEMA)
    assert kept["weight"].to_list() == [1.0, 1.0]  # no clusterings: every weight is 1
    assert (built["indexed"], built["kept"], built["removed"]) == (9, 2, 7)
    assert built["removed_by_kind"] == {"decode": 2, "filter": 2, "duplicate_of": 2, "no_embedding": 1}
    ok, info = read_accounting(wh)
    assert ok, info

    manifest = pl.read_parquet(built["manifest"])
    assert manifest.equals(kept)
    assert [p.name for p in built["manifest"].parent.iterdir()] == ["filtered_dataset.parquet"]  # no temp file


def test_absent_prefilter_and_groups_keep_every_decodable_image(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path, prefilter=False, groups=None, embedded=False)
    _build(wh, tmp_path)
    kept, removed = _tables(wh)
    assert kept["image_id"].to_list() == ["s0/a", "s0/b", "s0/d", "s1/e", "s1/f", "s1/g", "s1/h"]
    assert removed["reason"].to_list() == ["decode:truncated", "decode:not_an_image"]


def test_weights_come_from_cluster_counts_and_unclustered_images_weigh_one(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path, prefilter=False, groups=None, embedded=False)
    # Cluster 0 holds a, b, d, e (all kept), cluster 1 holds f, g (kept) and c (not ok, removed).
    # Before: 4/7 and 3/7; after: 4/6 and 2/6 → ratios 6/7·… normalised to mean 1 over the six.
    rows = [("s0/a", 0), ("s0/b", 0), ("s0/d", 0), ("s1/e", 0), ("s1/f", 1), ("s1/g", 1), ("s0/c", 1)]
    wh.replace_table("clusterings", pl.DataFrame({
        "image_id": [r[0] for r in rows], "shard": [r[0][:2] for r in rows], "clustering": [0] * len(rows),
        "cluster": [r[1] for r in rows], "cluster2": [-1] * len(rows)}))
    built = _build(wh, tmp_path)
    kept, _ = _tables(wh)
    w = dict(zip(kept["image_id"].to_list(), kept["weight"].to_list()))
    assert built["counts"].sort("cluster").rows() == [(0, 4, 4), (1, 3, 2)]
    r0, r1 = (4 / 7) / (4 / 6), (3 / 7) / (2 / 6)
    s = 6 / (4 * r0 + 2 * r1)
    assert w["s0/a"] == pytest.approx(s * r0) and w["s1/f"] == pytest.approx(s * r1)
    assert w["s1/h"] == 1.0  # kept, in no cluster
    assert sum(w[i] for i in ("s0/a", "s0/b", "s0/d", "s1/e", "s1/f", "s1/g")) == pytest.approx(6.0)


def test_group_without_a_single_keeper_is_refused(tmp_path: Path) -> None:
    groups = _groups().with_columns((pl.col("is_keeper") | (pl.col("image_id") == "s0/b")).alias("is_keeper"))
    wh = _warehouse(tmp_path, groups=groups)
    with pytest.raises(SelectionError, match="exactly one keeper"):
        _build(wh, tmp_path)


def test_duplicate_index_rows_fail_and_leave_the_old_tables(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path)
    _build(wh, tmp_path)
    before = _tables(wh)
    wh.replace_table("image_index", pl.concat([_index(), _index().head(1)]))
    with pytest.raises(AssertionError, match="does not equal the index"):
        _build(wh, tmp_path)
    after = _tables(wh)
    assert after[0].equals(before[0]) and after[1].equals(before[1])  # rolled back


def test_accounting_names_each_kind_of_problem(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path)
    _build(wh, tmp_path)
    kept, removed = _tables(wh)

    def check(k: pl.DataFrame, r: pl.DataFrame) -> dict:
        wh.replace_table("filtered_dataset", k)
        wh.replace_table("removed_images", r)
        ok, info = read_accounting(wh)
        assert not ok
        return info

    def removed_row(image_id: str) -> pl.DataFrame:
        return pl.DataFrame({"image_id": [image_id], "shard": ["x"], "reason": ["x"], "detail": [None]},
                            schema=REMOVED_SCHEMA)

    assert check(kept.filter(pl.col("image_id") != "s1/h"), removed)["missing"] == ["s1/h"]
    assert check(kept, pl.concat([removed, removed_row("s0/a")]))["in_both"] == ["s0/a"]
    assert check(kept, pl.concat([removed, removed_row("zz/unknown")]))["unknown"] == ["zz/unknown"]
    assert check(pl.concat([kept, kept.head(1)]), removed)["duplicated_rows"] == 1
    assert tables.REMOVED_IMAGES == "removed_images"
