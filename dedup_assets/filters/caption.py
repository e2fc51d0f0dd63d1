"""Caption rules of Conceptual Captions, offline: junk captions, profanity, language.

Every caption is first repaired with ftfy (mojibake such as "cafÃ©" -> "café", odd whitespace),
and every rule judges the repaired caption, which is reported as `caption_clean`.

- Rules (pure, per caption): missing, too short / too long (in words: tokens that have a
  letter and are not #hashtags, @handles, links or file names), mostly #hashtags, mostly
  @handles, mostly links, a file name ("IMG_1234.JPG", "DSC0001", "20190312_154501.jpg"), an
  SEO keyword list ("cheap, best, buy, sale, free shipping, 2024, wallpaper") or a bare tag
  list ("dog, puppy, cute, pet, animal"). The junk rules speak English: the function words that
  tell a description from a tag list are English ones, like the pipeline the defaults come from.
- Profanity: alt-profanity-check (MIT), a calibrated linear SVM on TF-IDF features whose model
  ships inside the wheel; scored in one batch per frame.
- Language: lingua-language-detector (Apache-2.0), whose n-gram models ship inside the wheel.
  The detector tells apart a fixed set of common web languages plus the allowed ones (a small
  set keeps model loading at a few seconds, once per process). A caption fails when the allowed
  languages together get less than `min_language_confidence` of lingua's confidence.

Grain: one call per caption, or one batch call per frame for the two models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dedup_assets.filters.config import PrefilterConfig

if TYPE_CHECKING:
    from lingua import LanguageDetector

# Languages the detector always tells apart, so that "not English" can be recognized as some
# other language; the allowed languages are added to these.
DETECTOR_LANGUAGES: tuple[str, ...] = (
    "ar", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt", "ru", "sv", "tr", "vi", "zh",
)

_EDGE_PUNCT = "\"'“”‘’()[]{}<>.,;:!?…"
_HASHTAG = re.compile(r"^#\w+$")
_HANDLE = re.compile(r"^@\w+$")
_URL = re.compile(
    r"^(?:(?:https?|ftp)://\S+|www\.\S+"
    r"|[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|info|biz|io|co|me|tv|ly|gl|uk|de|fr|ru|jp|cn|in|us|eu)(?:/\S*)?)$",
    re.IGNORECASE,
)
_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|raw|cr2|nef|arw|dng|svg|psd)"
_FILENAME = re.compile(
    rf"^(?:[\w\-.~()]+\.{_IMAGE_EXT}"  # anything.jpg
    # IMG_1234, DSC0001, PXL_20230101_...
    r"|(?:img|dsc|dscn|dscf|dcim|pxl|mvimg|gopr|sam|wp|pano|photo|image|pic|screenshot)[_\-]?\d{3,}[\w\-]*"
    r"|\d{6,}(?:[_\-]\d+)*)$",  # 20190312_154501 (phone file names without extension)
    re.IGNORECASE,
)
_HAS_LETTER = re.compile(r"[^\W\d_]")
_LIST_SPLIT = re.compile(r"\s*[,|;•·]\s*|\s+[-/]\s+")
_DIGIT = re.compile(r"\d")

# Terms that mark shop listings and SEO keyword stuffing when a caption is a list of them.
SEO_TERMS = frozenset(
    "cheap best buy sale sales free shipping discount discounts deal deals offer offers price prices "
    "shop store online download downloads wallpaper wallpapers hd uhd hq 4k 8k stock royalty clipart "
    "vector vectors png jpg jpeg transparent images photos pics pictures ideas new top quality "
    "wholesale coupon promo bestseller trending viral".split()
)
# English function words: one of them anywhere means the caption is a sentence or phrase, not a
# bare list of tags.
FUNCTION_WORDS = frozenset(
    "a an the of on in at with and or by for from to into onto over under near behind beside between "
    "during while is are was were his her their its this that these those who which".split()
)


@dataclass(frozen=True)
class CaptionTokens:
    """The whitespace tokens of a caption sorted into the kinds the junk rules count."""

    n_tokens: int
    hashtags: int = 0
    handles: int = 0
    urls: int = 0
    filenames: int = 0
    words: list[str] = field(default_factory=list)


def fix_caption(caption: str | None) -> str | None:
    """Repair mojibake and normalize whitespace (ftfy); None stays None."""
    if caption is None:
        return None
    import ftfy

    return " ".join(ftfy.fix_text(caption).split())


def tokenize_caption(caption: str) -> CaptionTokens:
    """Sort the tokens of an already repaired caption into hashtags, handles, links, file names
    and words (everything else that has a letter: "1 2 3" has no words)."""
    tokens = caption.split()
    counts = {"hashtags": 0, "handles": 0, "urls": 0, "filenames": 0}
    words: list[str] = []
    for raw in tokens:
        tok = raw.strip(_EDGE_PUNCT) if not raw.startswith(("#", "@")) else raw.rstrip(_EDGE_PUNCT)
        if _HASHTAG.match(tok):
            counts["hashtags"] += 1
        elif _HANDLE.match(tok):
            counts["handles"] += 1
        elif _URL.match(tok):
            counts["urls"] += 1
        elif _FILENAME.match(tok):
            counts["filenames"] += 1
        elif _HAS_LETTER.search(tok):
            words.append(tok)
    return CaptionTokens(n_tokens=len(tokens), words=words, **counts)


def _seo_reason(caption: str, cfg: PrefilterConfig) -> bool:
    items = [i for i in (s.strip().lower() for s in _LIST_SPLIT.split(caption)) if i]
    if len(items) < cfg.seo_min_items:
        return False
    item_words = [re.findall(r"\w+", item) for item in items]
    seo = sum(bool(_DIGIT.search(item)) or any(w in SEO_TERMS for w in ws) for item, ws in zip(items, item_words))
    if seo > cfg.max_seo_fraction * len(items):
        return True
    # A bare tag list: many short items and not one function word anywhere.
    all_words = [w for ws in item_words for w in ws]
    return (
        len(items) > cfg.seo_min_items
        and all(len(ws) <= 3 for ws in item_words)
        and not any(w in FUNCTION_WORDS for w in all_words)
    )


def rule_reasons(caption: str | None, cfg: PrefilterConfig, tokens: CaptionTokens | None = None) -> list[str]:
    """The model-free caption rules on an already repaired caption, in a fixed order.

    A missing or blank caption fails `caption_missing` only; otherwise every rule that fails is
    listed (a tag-only caption is both `caption_hashtags` and `caption_short`). `tokens`: the
    caption's `tokenize_caption`, when the caller has it already (it is the costly part).
    """
    if caption is None or not caption.strip():
        return ["caption_missing"]
    tok = tokens if tokens is not None else tokenize_caption(caption)
    reasons: list[str] = []
    n_words = len(tok.words)
    if n_words < cfg.caption_min_words:
        reasons.append("caption_short")
    if n_words > cfg.caption_max_words:
        reasons.append("caption_long")
    if tok.hashtags > cfg.max_hashtag_fraction * tok.n_tokens:
        reasons.append("caption_hashtags")
    if tok.handles > cfg.max_handle_fraction * tok.n_tokens:
        reasons.append("caption_handles")
    if tok.urls > cfg.max_url_fraction * tok.n_tokens:
        reasons.append("caption_urls")
    if tok.filenames and n_words < cfg.caption_min_words:
        reasons.append("caption_filename")
    if _seo_reason(caption, cfg):
        reasons.append("caption_seo")
    return reasons


def language_text(caption: str, tokens: CaptionTokens | None = None) -> str:
    """The words of a repaired caption without tags, handles, links and file names: what the
    language detector should judge."""
    return " ".join((tokens if tokens is not None else tokenize_caption(caption)).words)


def profanity_scores(texts: Sequence[str]) -> np.ndarray:
    """Probability that each text is profane (alt-profanity-check), in one batch; float32 [0, 1]."""
    if not texts:
        return np.zeros(0, dtype=np.float32)
    from profanity_check import predict_prob

    return np.clip(np.asarray(predict_prob(list(texts)), dtype=np.float32), 0.0, 1.0)


def detector_languages(cfg: PrefilterConfig) -> tuple[str, ...]:
    """The ISO 639-1 codes the language detector tells apart for this config."""
    return tuple(sorted(set(DETECTOR_LANGUAGES) | set(cfg.languages or ())))


@lru_cache(maxsize=4)
def language_detector(codes: tuple[str, ...]) -> LanguageDetector:
    """One lingua detector per language set and process. Building is instant; lingua loads each
    language's models on first use (a few seconds for the default set), so the cache matters."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_iso_codes_639_1(*[IsoCode639_1.from_str(c) for c in codes]).build()


@dataclass(frozen=True)
class LanguageScore:
    """The detector's verdict on one text."""

    language: str | None  # most likely ISO 639-1 code; None when no language could be scored
    confidence: float  # lingua's confidence in that language
    allowed_confidence: float  # summed confidence of the allowed languages


def language_scores(texts: Sequence[str], cfg: PrefilterConfig) -> list[LanguageScore]:
    """Language of each text among `detector_languages(cfg)`; batched over lingua's threads."""
    if not texts:
        return []
    detector = language_detector(detector_languages(cfg))
    allowed = set(cfg.languages or ())
    texts = list(texts)
    if len(texts) == 1:
        values = [detector.compute_language_confidence_values(texts[0])]
    else:
        values = detector.compute_language_confidence_values_in_parallel(texts)
    out = []
    for vals in values:
        if not vals or vals[0].value <= 0:  # no letters lingua knows: nothing to judge
            out.append(LanguageScore(None, 0.0, 0.0))
            continue
        codes = [(v.language.iso_code_639_1.name.lower(), float(v.value)) for v in vals]
        out.append(LanguageScore(codes[0][0], codes[0][1], sum(c for code, c in codes if code in allowed)))
    return out


def profanity_fails(score: float, cfg: PrefilterConfig) -> bool:
    return score >= cfg.profanity_threshold


def language_fails(score: LanguageScore, cfg: PrefilterConfig) -> bool:
    return score.language is not None and score.allowed_confidence < cfg.min_language_confidence
