"""Known-answer cases for every pre-filter rule, the NSFW scorer offline, and failure handling."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.filters.caption import caption_reasons, fix_text, rule_reasons
from dedup_assets.filters.config import FilterDependencyError, PrefilterConfig, check_dependencies
from dedup_assets.filters.image import image_reasons
from dedup_assets.filters.run import PREFILTER_SCHEMA, run_prefilter, summarize_prefilter
from dedup_assets.ingest.index import INDEX_SCHEMA

CFG = PrefilterConfig()


@pytest.mark.parametrize(
    "fmt,w,h,size,expected",
    [
        ("JPEG", 400, 400, 1000, []),
        ("JPEG", 399, 700, 1000, ["min_side"]),
        ("JPEG", 399, 800, 1000, ["min_side", "aspect_ratio"]),
        ("PNG", 800, 400, 1000, []),  # aspect exactly 2.0 passes
        ("PNG", 804, 400, 1000, ["aspect_ratio"]),  # 2.01
        ("PSD", 500, 500, 1000, ["format"]),
    ],
)
def test_image_rules_on_boundaries(fmt: str, w: int, h: int, size: int, expected: list[str]) -> None:
    assert image_reasons(fmt, w, h, size, CFG) == expected


def test_file_size_rule_is_optional() -> None:
    assert image_reasons("JPEG", 500, 500, 10_000, CFG) == []
    assert image_reasons("JPEG", 500, 500, 10_000, PrefilterConfig(max_file_bytes=5_000)) == ["file_size"]


@pytest.mark.parametrize(
    "caption,reason",
    [
        ("#sunset #beach #love #instagood", "caption_hashtags"),
        ("@alice @bob @carol @dave", "caption_handles"),
        ("https://a.example/x http://b.example/y www.c.example", "caption_urls"),
        ("IMG_1234.JPG", "caption_filename"),
        ("DSC0001", "caption_filename"),
        ("cheap, best, buy, sale, free shipping, wallpaper, hd, 2024", "caption_seo"),
        ("", "caption_missing"),
        (None, "caption_missing"),
        ("a dog", "caption_short"),
        (" ".join(["word"] * 80), "caption_long"),
    ],
)
def test_caption_rules(caption: str | None, reason: str) -> None:
    assert reason in rule_reasons(caption, CFG)


def test_a_good_descriptive_caption_passes_every_caption_filter() -> None:
    reasons, scores = caption_reasons("a brown dog running across a green field on a sunny day", CFG)
    assert reasons == []
    assert scores["language"] == "en" and scores["profanity"] < 0.5


def test_profanity_uses_the_trained_model() -> None:
    reasons, scores = caption_reasons("this is a fucking stupid piece of shit photo", CFG)
    assert "caption_profanity" in reasons and scores["profanity"] >= 0.5


def test_language_filter() -> None:
    fr = "un paysage tranquille avec des collines vertes sous un ciel bleu"
    de = "eine ruhige Landschaft mit grünen Hügeln unter einem blauen Himmel"
    assert "caption_language" in caption_reasons(fr, CFG)[0]
    assert "caption_language" in caption_reasons(de, CFG)[0]
    assert "caption_language" not in caption_reasons(fr, PrefilterConfig(languages=("en", "fr")))[0]
    assert "caption_language" not in caption_reasons(fr, PrefilterConfig(languages=None))[0]


def test_mojibake_is_fixed_first() -> None:
    assert fix_text("cafÃ© au lait") == "café au lait"
    _, scores = caption_reasons("a cup of cafÃ© au lait on a wooden table", CFG)
    assert scores["caption_clean"] == "a cup of café au lait on a wooden table"


def test_config_validates_with_a_message() -> None:
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        PrefilterConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="unknown language codes"):
        PrefilterConfig(languages=("xx",))
    d = CFG.describe()
    assert d["min_side"] == 400 and d["max_aspect_ratio"] == 2.0 and d["languages"] == ["en"]


def _index(rows: list[dict]) -> pl.DataFrame:
    base = {k: None for k in INDEX_SCHEMA}
    return pl.DataFrame([{**base, **r} for r in rows], schema=INDEX_SCHEMA)


def test_run_prefilter_rows_reasons_and_summary() -> None:
    index = _index([
        {"image_id": "s/a", "shard": "s", "status": "ok", "format": "JPEG", "width": 640, "height": 480, "bytes": 9,
         "caption": "a red bicycle leaning against an old brick wall"},
        {"image_id": "s/b", "shard": "s", "status": "ok", "format": "JPEG", "width": 100, "height": 480, "bytes": 9,
         "caption": "#bike #cool #love #instagood"},
        {"image_id": "s/c", "shard": "s", "status": "truncated", "caption": "whatever"},
    ])
    df = run_prefilter(index, CFG)
    assert dict(df.schema) == PREFILTER_SCHEMA and df.height == 3
    rows = {r["image_id"]: r for r in df.iter_rows(named=True)}
    assert rows["s/a"]["passed"] and rows["s/a"]["reasons"] == []
    assert not rows["s/b"]["passed"] and {"min_side", "aspect_ratio", "caption_hashtags"} <= set(rows["s/b"]["reasons"])
    assert rows["s/c"]["reasons"] == ["decode:truncated"]
    summary = summarize_prefilter(df)
    assert summary["removed_by_reason"]["caption_hashtags"] == 1 and "s/b" in summary["examples"]["min_side"][0]


def test_a_rule_that_raises_on_one_row_is_recorded_and_keeps_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import dedup_assets.filters.run as run

    def flaky(caption, cfg):  # noqa: ANN001, ANN202
        if caption and "boom" in caption:
            raise RuntimeError("rule crashed")
        return []

    monkeypatch.setattr(run, "rule_reasons", flaky)
    index = _index([
        {"image_id": f"s/{i}", "shard": "s", "status": "ok", "format": "JPEG", "width": 500, "height": 500,
         "bytes": 1, "caption": cap}
        for i, cap in enumerate(["a calm lake at dawn with mist", "boom goes the caption here", "a quiet street at night"])
    ])
    df = run_prefilter(index, PrefilterConfig(profanity=False, languages=None))
    assert df.height == 3
    assert df.filter(pl.col("image_id") == "s/1")["reasons"].to_list() == [["error:caption"]]
    assert df["passed"].to_list() == [True, False, True]


def test_missing_dependency_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real(name, *a))
    with pytest.raises(FilterDependencyError, match=r"pip install -e '\.\[nsfw\]'"):
        check_dependencies(PrefilterConfig(nsfw=True))
    check_dependencies(PrefilterConfig(nsfw=False))  # disabled: no error


@pytest.mark.skipif(importlib.util.find_spec("nudenet") is None, reason="the nsfw extra is not installed")
def test_nsfw_scorer_runs_offline_and_benign_images_pass() -> None:
    from dedup_assets.filters.content import get_scorer
    from dedup_assets.synth.bases import make_base_images

    sky = np.zeros((320, 480, 3), np.uint8)
    sky[..., 2] = np.linspace(120, 255, 320)[:, None].astype(np.uint8)
    images = [Image.fromarray(sky)] + [im for _, im in make_base_images(4, seed=1)]
    scores = get_scorer().score(images)
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores < CFG.nsfw_threshold).all()
