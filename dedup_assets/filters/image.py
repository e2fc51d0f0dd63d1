"""Image rules of Conceptual Captions: format whitelist, minimum side, aspect ratio, file size."""

from __future__ import annotations

from dedup_assets.filters.config import PrefilterConfig


def image_reasons(fmt: str | None, width: int | None, height: int | None, file_bytes: int | None, cfg: PrefilterConfig) -> list[str]:
    """Reasons this decoded image fails the image rules ([] when it passes)."""
    reasons = []
    if fmt not in cfg.allowed_formats:
        reasons.append("format")
    if width is None or height is None or min(width, height) < cfg.min_side:
        reasons.append("min_side")
    if width and height and max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        reasons.append("aspect_ratio")
    if cfg.max_file_bytes is not None and file_bytes is not None and file_bytes > cfg.max_file_bytes:
        reasons.append("file_size")
    return reasons
