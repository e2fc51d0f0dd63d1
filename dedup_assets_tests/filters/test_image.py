"""Image rules on their boundary values."""

from __future__ import annotations

import pytest

from dedup_assets.filters.config import PrefilterConfig
from dedup_assets.filters.image import image_reasons

CFG = PrefilterConfig()


@pytest.mark.parametrize(
    "fmt,w,h,expected",
    [
        ("JPEG", 400, 400, []),
        ("JPEG", 399, 400, ["min_side"]),
        ("JPEG", 400, 399, ["min_side"]),
        ("PNG", 800, 400, []),  # aspect exactly 2.0 passes
        ("PNG", 400, 800, []),
        ("PNG", 804, 400, ["aspect_ratio"]),  # 2.01
        ("PNG", 400, 804, ["aspect_ratio"]),
        ("JPEG", 399, 800, ["min_side", "aspect_ratio"]),
        ("PSD", 500, 500, ["format"]),
        ("jpeg", 500, 500, []),  # PIL names are upper case; a lower-case one is the same format
        ("MPO", 500, 500, []),  # phone JPEGs
        (None, 500, 500, ["format"]),
        ("JPEG", None, 500, ["min_side"]),  # an unknown size cannot be shown to be large enough
        ("JPEG", 0, 0, ["min_side"]),
    ],
)
def test_image_rules_on_boundaries(fmt: str | None, w: int | None, h: int | None, expected: list[str]) -> None:
    assert image_reasons(fmt, w, h, 1000, CFG) == expected


def test_smaller_min_side_and_wider_aspect_are_respected() -> None:
    cfg = PrefilterConfig(min_side=64, max_aspect_ratio=4.0)
    assert image_reasons("JPEG", 64, 256, 1, cfg) == []
    assert image_reasons("JPEG", 63, 252, 1, cfg) == ["min_side"]
    assert image_reasons("JPEG", 64, 257, 1, cfg) == ["aspect_ratio"]


def test_file_size_rule_is_off_by_default_and_inclusive_at_the_limit() -> None:
    assert image_reasons("JPEG", 500, 500, 10**9, CFG) == []
    cfg = PrefilterConfig(max_file_bytes=5_000)
    assert image_reasons("JPEG", 500, 500, 5_000, cfg) == []
    assert image_reasons("JPEG", 500, 500, 5_001, cfg) == ["file_size"]
    assert image_reasons("JPEG", 500, 500, None, cfg) == []
