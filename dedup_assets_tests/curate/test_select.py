"""Known-answer tests for the kept/removed split and its accounting check."""

from __future__ import annotations

import polars as pl
import pytest

from dedup_assets.curate.select import KEPT_SCHEMA, REMOVED_SCHEMA, check_accounting, select


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


def _embedded() -> pl.Series:
    return pl.Series("image_id", ["s0/a", "s0/b", "s0/d", "s1/e", "s1/f", "s1/h"])


def test_reasons_follow_precedence_and_account_for_every_file() -> None:
    index = _index()
    kept, removed = select(index, _prefilter(), _groups(), _embedded())

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
    assert kept["weight"].to_list() == [1.0, 1.0]
    assert removed["image_id"].to_list() == sorted(removed["image_id"].to_list())
    assert set(kept["image_id"]) | set(removed["image_id"]) == set(index["image_id"])
    assert kept.height + removed.height == index.height
    ok, info = check_accounting(index, kept, removed)
    assert ok, info
    assert (info["indexed"], info["kept"], info["removed"]) == (9, 2, 7)


def test_absent_prefilter_and_groups_keep_every_decodable_image() -> None:
    kept, removed = select(_index(), None, None)
    assert kept["image_id"].to_list() == ["s0/a", "s0/b", "s0/d", "s1/e", "s1/f", "s1/g", "s1/h"]
    assert removed["reason"].to_list() == ["decode:truncated", "decode:not_an_image"]


def test_embedding_failure_reason_is_named() -> None:
    failures = pl.DataFrame({"image_id": ["s1/g"], "reason": ["too_small"], "error": ["3x3"]})
    _, removed = select(_index(), None, None, _embedded(), embedding_failures=failures)
    reasons = dict(zip(removed["image_id"].to_list(), removed["reason"].to_list()))
    assert reasons["s1/g"] == "no_embedding:too_small"


def test_group_without_a_single_keeper_is_refused() -> None:
    groups = _groups().with_columns((pl.col("is_keeper") | (pl.col("image_id") == "s0/b")).alias("is_keeper"))
    with pytest.raises(ValueError, match="exactly one keeper"):
        select(_index(), None, groups)


def test_duplicate_index_rows_fail_the_accounting() -> None:
    index = pl.concat([_index(), _index().head(1)])
    with pytest.raises(AssertionError, match="does not equal the index"):
        select(index, None, None)


def test_check_accounting_names_each_kind_of_problem() -> None:
    index = _index()
    kept, removed = select(index, _prefilter(), _groups(), _embedded())

    ok, info = check_accounting(index, kept.filter(pl.col("image_id") != "s1/h"), removed)
    assert not ok and info["missing"] == ["s1/h"]

    def removed_row(image_id: str) -> pl.DataFrame:
        return pl.DataFrame({"image_id": [image_id], "shard": ["x"], "reason": ["x"], "detail": [None]},
                            schema=REMOVED_SCHEMA)

    ok, info = check_accounting(index, kept, pl.concat([removed, removed_row("s0/a")]))
    assert not ok and info["in_both"] == ["s0/a"]

    ok, info = check_accounting(index, kept, pl.concat([removed, removed_row("zz/unknown")]))
    assert not ok and info["unknown"] == ["zz/unknown"]

    ok, info = check_accounting(index, pl.concat([kept, kept.head(1)]), removed)
    assert not ok and info["duplicated_rows"] == 1
