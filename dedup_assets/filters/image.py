"""Image rules of Conceptual Captions: format whitelist, minimum side, aspect ratio, file size.

Pure functions of the index columns (format, width, height, bytes); no pixels are read. Grain:
one call per image.
"""

from __future__ import annotations

from dedup_assets.filters.config import PrefilterConfig


def image_reasons(
    fmt: str | None,
    width: int | None,
    height: int | None,
    file_bytes: int | None,
    cfg: PrefilterConfig,
) -> list[str]:
    """Reasons a decoded image fails the image rules, in a fixed order; [] when it passes.

    `width`/`height` are after EXIF orientation. An unknown size fails `min_side` (it cannot be
    shown to be large enough); the aspect ratio is only judged on a known, non-zero size. The
    limits themselves pass: a 400-px side with min_side=400, a ratio of exactly 2.0 with
    max_aspect_ratio=2.0. An unknown file size never fails `file_size`.
    """
    reasons: list[str] = []
    if fmt is None or fmt.upper() not in cfg.allowed_formats:
        reasons.append("format")
    if width is None or height is None or min(width, height) < cfg.min_side:
        reasons.append("min_side")
    if width and height and width > 0 and height > 0:
        # Compare by cross-multiplication: 804/400 vs 2.0 must not depend on float rounding.
        long_side, short_side = max(width, height), min(width, height)
        if long_side > cfg.max_aspect_ratio * short_side:
            reasons.append("aspect_ratio")
    if cfg.max_file_bytes is not None and file_bytes is not None and file_bytes > cfg.max_file_bytes:
        reasons.append("file_size")
    return reasons
