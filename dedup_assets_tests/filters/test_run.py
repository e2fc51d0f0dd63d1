"""run_prefilter over an index frame: one row per index row, reasons, scores, failure isolation."""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import polars as pl
import pytest

import dedup_assets.filters.run as run
from dedup_assets.filters.config import FilterDependencyError, PrefilterConfig
from dedup_assets.filters.run import PREFILTER_SCHEMA, run_prefilter, summarize_prefilter

MakeIndex = Callable[[list[dict]], pl.DataFrame]
NO_MODELS = PrefilterConfig(profanity=False, languages=None)


def test_one_row_per_index_row_with_reasons_scores_and_summary(make_index: MakeIndex) -> None:
    index = make_index([
        {"image_id": "s/a", "caption": "a red bicycle leaning against an old brick wall"},
        {"image_id": "s/b", "width": 100, "caption": "#bike #cool #love #instagood"},
        {"image_id": "s/c", "status": "truncated", "format": None, "width": None, "caption": "whatever"},
        {"image_id": "s/d", "caption": "un vélo rouge contre un vieux mur de briques"},
        {"image_id": "s/e", "caption": "a cup of cafÃ© au lait on a wooden table"},
        {"image_id": "s/f", "caption": None, "format": "PSD"},
    ])
    df = run_prefilter(index, PrefilterConfig())
    assert dict(df.schema) == PREFILTER_SCHEMA and list(df.columns) == list(PREFILTER_SCHEMA)
    assert df["image_id"].to_list() == index["image_id"].to_list()
    rows = {r["image_id"]: r for r in df.iter_rows(named=True)}
    assert rows["s/a"]["passed"] and rows["s/a"]["reasons"] == [] and rows["s/a"]["language"] == "en"
    assert rows["s/b"]["reasons"] == ["min_side", "aspect_ratio", "caption_short", "caption_hashtags"]
    assert rows["s/c"]["reasons"] == ["decode:truncated"] and rows["s/c"]["profanity"] is None
    assert rows["s/d"]["reasons"] == ["caption_language"] and rows["s/d"]["language"] == "fr"
    assert rows["s/e"]["passed"] and rows["s/e"]["caption_clean"] == "a cup of café au lait on a wooden table"
    assert rows["s/f"]["reasons"] == ["format", "caption_missing"] and rows["s/f"]["profanity"] is None
    assert df["passed"].to_list() == [True, False, False, False, True, False]
    assert rows["s/a"]["nsfw"] is None  # nsfw is off by default

    summary = summarize_prefilter(df, examples_per_reason=1)
    assert (summary["rows"], summary["passed"], summary["removed"]) == (6, 2, 4)
    assert summary["removed_by_reason"] == {
        "aspect_ratio": 1, "caption_hashtags": 1, "caption_language": 1, "caption_missing": 1,
        "caption_short": 1, "decode:truncated": 1, "format": 1, "min_side": 1,
    }
    assert summary["examples"]["caption_hashtags"] == [{"image_id": "s/b", "caption": "#bike #cool #love #instagood"}]


def test_summary_counts_most_frequent_first_and_limits_examples(make_index: MakeIndex) -> None:
    index = make_index([{"width": 50, "caption": "a small photo of a lake"} for _ in range(5)]
                       + [{"format": "PSD", "caption": "a layered design of a lake"}])
    summary = summarize_prefilter(run_prefilter(index, NO_MODELS), examples_per_reason=2)
    # Ties are broken by name, so the order is stable from run to run.
    assert list(summary["removed_by_reason"].items()) == [("aspect_ratio", 5), ("min_side", 5), ("format", 1)]
    assert [e["image_id"] for e in summary["examples"]["min_side"]] == ["s/0000", "s/0001"]


def test_an_empty_frame_gives_an_empty_result_with_the_schema(make_index: MakeIndex) -> None:
    df = run_prefilter(make_index([]), PrefilterConfig())
    assert df.height == 0 and dict(df.schema) == PREFILTER_SCHEMA
    assert summarize_prefilter(df) == {"rows": 0, "passed": 0, "removed": 0, "removed_by_reason": {}, "examples": {}}


def test_a_rule_that_raises_on_one_row_is_recorded_and_every_row_is_kept(
    make_index: MakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = run.rule_reasons

    def rule_that_breaks_on_boom(caption, cfg, tokens=None):  # noqa: ANN001, ANN202
        if caption and "boom" in caption:
            raise RuntimeError("rule crashed")
        return real(caption, cfg, tokens)

    monkeypatch.setattr(run, "rule_reasons", rule_that_breaks_on_boom)
    logged: list[str] = []
    index = make_index([{"caption": c} for c in ["a calm lake at dawn", "boom goes the caption", "a quiet street"]])
    df = run_prefilter(index, NO_MODELS, log=logged.append)
    assert df.height == 3
    assert df["reasons"].to_list() == [[], ["error:caption"], []]
    assert df["passed"].to_list() == [True, False, True]
    assert any("error:caption" in line and "rule crashed" in line for line in logged)


def test_a_batch_model_that_raises_marks_only_the_rows_it_fails_on(
    make_index: MakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = run.profanity_scores

    def model_that_breaks_on_boom(texts):  # noqa: ANN001, ANN202
        if any("boom" in t for t in texts):
            raise ValueError("vectorizer crashed")
        return real(texts)

    monkeypatch.setattr(run, "profanity_scores", model_that_breaks_on_boom)
    index = make_index([{"caption": c} for c in ["a calm lake at dawn", "boom goes the caption", "a quiet street"]])
    df = run_prefilter(index, PrefilterConfig(languages=None))
    assert df["reasons"].to_list() == [[], ["error:profanity"], []]
    prof = df["profanity"].to_list()
    assert prof[1] is None and all(0 <= p < 0.5 for p in (prof[0], prof[2]))


def test_a_missing_package_stops_the_run_before_any_work(
    make_index: MakeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    with pytest.raises(FilterDependencyError, match="set profanity=False"):
        run_prefilter(make_index([{"caption": "a calm lake at dawn"}]), PrefilterConfig())
    run_prefilter(make_index([{"caption": "a calm lake at dawn"}]), PrefilterConfig(profanity=False))


def test_an_index_without_the_needed_columns_is_rejected(make_index: MakeIndex) -> None:
    with pytest.raises(ValueError, match=r"lacks columns \['status'\]"):
        run_prefilter(make_index([{"caption": "a lake"}]).drop("status"), NO_MODELS)


def test_scores_are_float32_in_unit_range(make_index: MakeIndex) -> None:
    captions = ["a calm lake at dawn", "this is a fucking stupid piece of shit photo", "ein Hund im Garten spielt"]
    df = run_prefilter(make_index([{"caption": c} for c in captions]), PrefilterConfig())
    prof = df["profanity"].to_numpy()
    conf = df["language_confidence"].to_numpy()
    assert ((prof >= 0) & (prof <= 1)).all() and ((conf >= 0) & (conf <= 1)).all()
    assert df["reasons"].to_list() == [[], ["caption_profanity"], ["caption_language"]]
    assert np.isclose(prof[1], 1.0, atol=0.2)
