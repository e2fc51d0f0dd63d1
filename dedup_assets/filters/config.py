"""Configuration of the pre-filters, validated on construction, and their dependency check."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any


class FilterDependencyError(RuntimeError):
    """A filter is enabled but the package it needs is not installed."""


@dataclass(frozen=True)
class PrefilterConfig:
    """Thresholds of the Conceptual-Captions-style filters (defaults from that pipeline)."""

    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
    min_side: int = 400
    max_aspect_ratio: float = 2.0
    max_file_bytes: int | None = None
    caption_min_words: int = 3
    caption_max_words: int = 64
    max_tag_fraction: float = 0.5  # share of tokens that are #hashtags, @handles or URLs
    max_seo_fraction: float = 0.5  # share of comma-separated items that are SEO keywords
    profanity: bool = True
    profanity_threshold: float = 0.5
    languages: tuple[str, ...] | None = ("en",)
    language_min_confidence: float = 0.5
    nsfw: bool = False
    nsfw_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1 px, got {self.min_side}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 (long side / short side), got {self.max_aspect_ratio}")
        if self.caption_min_words < 0 or self.caption_max_words < self.caption_min_words:
            raise ValueError("need 0 <= caption_min_words <= caption_max_words")
        for name in ("profanity_threshold", "nsfw_threshold", "max_tag_fraction", "max_seo_fraction", "language_min_confidence"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.languages is not None:
            from dedup_assets.filters.caption import SUPPORTED_LANGUAGES

            unknown = [c for c in self.languages if c not in SUPPORTED_LANGUAGES]
            if unknown:
                raise ValueError(f"unknown language codes {unknown}; use ISO 639-1 codes from {sorted(SUPPORTED_LANGUAGES)}")

    def describe(self) -> dict[str, Any]:
        """Every threshold, for run metadata (a run is reproducible from it)."""
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


_NEEDS = {
    "profanity": ("profanity_check", "alt-profanity-check"),
    "languages": ("lingua", "lingua-language-detector"),
    "nsfw": ("nudenet", "nudenet"),
}


def check_dependencies(cfg: PrefilterConfig) -> None:
    """Raise FilterDependencyError, before any work starts, for an enabled filter without its package."""
    for flag, (module, package) in _NEEDS.items():
        enabled = bool(getattr(cfg, flag))
        if enabled and importlib.util.find_spec(module) is None:
            extra = " (the optional extra: pip install -e '.[nsfw]')" if flag == "nsfw" else ""
            raise FilterDependencyError(
                f"filter {flag!r} is enabled but the package {package!r} is not installed{extra}: "
                f"pip install {package}, or disable the filter ({flag}={'False' if flag != 'languages' else 'None'})"
            )
