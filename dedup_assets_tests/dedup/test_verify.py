"""Known answers of the geometric verifier (dedup.verify): every edit kind is accepted as a copy,
and every rejection rule rejects what it is for, under both notions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw

from dedup_assets.dedup.verify import (
    FeatureCache,
    VerifyConfig,
    extract_features,
    verify_candidates,
    verify_pair,
)
from dedup_assets.synth.bases import _font, make_clock, make_photo
from dedup_assets.synth.transforms import TRANSFORMS

COPY = VerifyConfig(notion="copy")
NEAR = VerifyConfig(notion="near_duplicate")


def _photo(seed: int, size=(320, 256)) -> Image.Image:
    return make_photo(np.random.default_rng(seed), size)


def _verdict(a: Image.Image, b: Image.Image, cfg: VerifyConfig = COPY):  # noqa: ANN202
    return verify_pair(extract_features(a, cfg), extract_features(b, cfg), cfg)


@pytest.mark.parametrize("edit", sorted(TRANSFORMS))
@pytest.mark.parametrize("cfg", [COPY, NEAR], ids=["copy", "near_duplicate"])
def test_every_edit_of_a_photo_is_accepted(edit: str, cfg: VerifyConfig) -> None:
    base = _photo(1)
    for seed in range(3):  # three random draws of the edit's parameters
        copy = TRANSFORMS[edit](base, np.random.default_rng(100 + seed)).convert("RGB")
        v = _verdict(base, copy, cfg)
        assert v.accepted is True, (edit, seed, v)
        assert v.inliers >= cfg.min_inliers and v.overlap >= cfg.min_overlap
        if edit == "flip" and cfg.notion == "copy":
            assert v.mirrored  # unmirrored, the content check sees another picture


def test_three_edits_at_once_are_accepted() -> None:
    base = _photo(2)
    rng = np.random.default_rng(5)
    img = base
    for name in ("crop", "jpeg", "watermark"):
        img = TRANSFORMS[name](img, rng)
    assert _verdict(base, img.convert("RGB")).accepted is True


def test_different_photos_have_too_few_agreeing_matches() -> None:
    for cfg in (COPY, NEAR):
        v = _verdict(_photo(3), _photo(4), cfg)
        assert v.accepted is False and v.reason == "few_inliers"


def _wide(seed: int) -> Image.Image:
    return _photo(seed, size=(800, 300))


@pytest.mark.parametrize("cfg", [COPY, NEAR], ids=["copy", "near_duplicate"])
def test_two_crops_of_one_photograph_that_overlap_little_are_not_copies(cfg: VerifyConfig) -> None:
    wide = _wide(6)
    left, right = wide.crop((0, 0, 440, 300)), wide.crop((360, 0, 800, 300))  # 80 of 440 px shared
    v = _verdict(left, right, cfg)
    assert v.accepted is False and v.reason in ("small_overlap", "few_inliers"), v
    # the same two crops overlapping by 80 %: the same picture
    a, b = wide.crop((0, 0, 440, 300)), wide.crop((44, 0, 484, 300))
    assert _verdict(a, b, cfg).accepted is True


@pytest.mark.parametrize("cfg", [COPY, NEAR], ids=["copy", "near_duplicate"])
def test_a_small_crop_is_not_a_copy_of_its_full_photograph(cfg: VerifyConfig) -> None:
    full = _photo(7, size=(640, 512))
    part = full.crop((100, 80, 420, 336))  # a quarter of the photograph, at full resolution
    v = _verdict(full, part, cfg)
    assert v.accepted is False and v.reason == "small_overlap", v
    assert v.inliers >= cfg.min_inliers  # it did match: the rule on the overlap is what rejects it


def test_a_shared_logo_is_not_the_same_picture() -> None:
    logo = make_clock(3, 15, size=110, style=2)  # a sharp emblem both pictures carry
    a, b = _photo(9), _photo(10)
    a.paste(logo, (20, 20))
    b.paste(logo, (200, 150))
    for cfg in (COPY, NEAR):
        v = _verdict(a, b, cfg)
        assert v.accepted is False and v.reason in ("small_overlap", "clustered_matches"), v
        assert v.inliers >= cfg.min_inliers  # the logo matched: a rule on the geometry rejects


def test_a_clock_at_another_hour_is_a_near_duplicate_but_not_a_copy() -> None:
    a, b = make_clock(2, 25, style=1), make_clock(7, 40, style=1)
    v = _verdict(a, b, COPY)
    assert v.accepted is False and v.reason == "content_differs", v
    assert _verdict(a, b, NEAR).accepted is True
    # the same clock re-encoded and resized stays a copy
    copy = TRANSFORMS["jpeg"](TRANSFORMS["resize"](a, np.random.default_rng(1)), np.random.default_rng(2))
    assert _verdict(a, copy.convert("RGB"), COPY).accepted is True


def test_other_text_on_one_template_is_not_a_copy() -> None:
    def card(words: str) -> Image.Image:
        img = Image.new("RGB", (320, 256), (240, 236, 220))
        d = ImageDraw.Draw(img)
        d.rectangle([8, 8, 311, 247], outline=(40, 60, 120), width=6)
        d.rectangle([8, 8, 311, 52], fill=(40, 60, 120))
        d.text((20, 14), "WEEKLY NOTICE", fill=(250, 250, 250), font=_font(26))
        for k, line in enumerate(words.split("|")):
            d.text((24, 76 + 50 * k), line, fill=(20, 20, 20), font=_font(24))
        return img

    a = card("harbor market|opens at seven|bring lanterns")
    b = card("glacier trail|closed tonight|thank you all")
    v = _verdict(a, b, COPY)
    assert v.accepted is False, v
    assert v.reason in ("content_differs", "few_inliers", "clustered_matches")
    assert _verdict(a, a.copy(), COPY).accepted is True


def test_implausible_scale_is_rejected() -> None:
    base = _photo(11)
    small = Image.new("RGB", (320, 256), (128, 128, 128))
    small.paste(base.resize((128, 102)), (96, 77))  # the photo at 0.4× inside a gray frame
    cfg = VerifyConfig(max_scale=1.5, min_overlap=0.1)
    v = _verdict(base, small, cfg)
    assert v.accepted is False and v.reason == "implausible_transform", v


def test_flat_images_are_undecided_not_rejected() -> None:
    blank = Image.new("RGB", (256, 256), (200, 40, 40))
    v = _verdict(blank, blank.copy())
    assert v.accepted is None and v.reason == "few_features"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="notion"):
        VerifyConfig(notion="same")
    with pytest.raises(ValueError):
        VerifyConfig(min_overlap=0)


def test_cache_decodes_each_image_once_and_records_failures() -> None:
    images = {"a": _photo(12), "b": _photo(13)}
    calls: list[str] = []

    def load(key: str) -> Image.Image:
        calls.append(key)
        if key == "bad":
            raise OSError("truncated")
        return images[key]

    cache = FeatureCache(load, COPY, max_bytes=1 << 30)
    for key in ("a", "b", "a", "bad", "bad", "b"):
        cache.get(key)
    assert calls == ["a", "b", "bad"]
    assert isinstance(cache.get("bad"), OSError)
    tiny = FeatureCache(load, COPY, max_bytes=1)  # keeps only the last image
    tiny.get("a")
    tiny.get("b")
    tiny.get("a")
    assert calls[-3:] == ["a", "b", "a"]


def test_verify_candidates_rules_per_pair_and_falls_back_on_tau_when_undecided() -> None:
    photo, other = _photo(14), _photo(15)
    blank = Image.new("RGB", (200, 200), (10, 200, 10))
    images = {"p": photo, "p2": TRANSFORMS["crop"](photo, np.random.default_rng(3)), "o": other, "x": blank}

    def load(loc: str) -> Image.Image:
        if loc == "missing":
            raise FileNotFoundError(loc)
        return images[loc]

    pairs = pl.DataFrame({
        "image_a": ["1", "1", "3", "3", "5"], "image_b": ["2", "4", "4", "6", "6"],
        "similarity": [0.85, 0.88, 0.95, 0.80, 0.99], "found_by": [1, 1, 1, 1, 1],
        "location_a": ["p", "p", "x", "x", "missing"], "location_b": ["p2", "o", "x", "x", "p"],
    }, schema_overrides={"similarity": pl.Float32, "found_by": pl.UInt8})
    df, st = verify_candidates(pairs, load, COPY, tau=0.9)
    assert df.height == 5 and df["image_a"].to_list() == pairs["image_a"].to_list()
    assert df["verdict"].to_list() == [
        "accepted", "rejected:few_inliers", "undecided:few_features", "undecided:few_features",
        "undecided:decode_error",
    ]
    # accepted below τ; rejected above the search threshold; undecided → similarity ≥ τ decides
    assert df["is_duplicate"].to_list() == [True, False, True, False, True]
    assert st.accepted == 1 and st.undecided == 3 and st.rejected == {"few_inliers": 1}
    pts = df["points_a"][0]
    assert pts is not None and len(pts) >= 2 * COPY.min_inliers // 2 and all(0 <= v <= 1 for v in pts)
