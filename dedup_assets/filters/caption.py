"""Caption rules: non-descriptive captions (too short/long, hashtags, @handles, URLs, file names,
SEO keyword lists), profanity (alt-profanity-check's trained model, offline), and language
(lingua-language-detector, offline). Mojibake is repaired first with ftfy.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Sequence

from dedup_assets.filters.config import PrefilterConfig

# Languages the detector tells apart (a fixed set keeps it small and fast to build); a caption is
# judged against all of them, then accepted only if its language is allowed.
SUPPORTED_LANGUAGES = {
    "en": "ENGLISH", "fr": "FRENCH", "de": "GERMAN", "es": "SPANISH", "it": "ITALIAN", "pt": "PORTUGUESE",
    "nl": "DUTCH", "ru": "RUSSIAN", "pl": "POLISH", "tr": "TURKISH", "sv": "SWEDISH", "id": "INDONESIAN",
    "vi": "VIETNAMESE", "zh": "CHINESE", "ja": "JAPANESE", "ko": "KOREAN", "ar": "ARABIC", "hi": "HINDI",
}

_TAG = re.compile(r"^(#\w+|@\w+|https?://\S+|www\.\S+)$", re.IGNORECASE)
_FILENAME = re.compile(
    r"^\s*(img|dsc|dscn|dcim|photo|image|pic|screenshot|pxl|wp)?[_\- ]?\d{2,}[\w\-]*(\.(jpe?g|png|gif|webp|bmp|tiff?|heic))?\s*$"
    r"|^\s*[\w\-]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic)\s*$",
    re.IGNORECASE,
)
SEO_WORDS = {
    "cheap", "best", "buy", "sale", "free", "shipping", "discount", "wallpaper", "wallpapers", "hd", "4k",
    "download", "online", "deal", "deals", "offer", "price", "shop", "new", "top", "quality", "stock",
    "royalty", "vector", "png", "jpg", "clipart", "transparent", "background", "images", "photos", "pics",
}


def fix_text(text: str) -> str:
    import ftfy

    return ftfy.fix_text(text).strip()


def rule_reasons(caption: str | None, cfg: PrefilterConfig) -> list[str]:
    """The non-model caption rules on an already repaired caption."""
    if caption is None or not caption.strip():
        return ["caption_missing"]
    tokens = caption.split()
    reasons = []
    if _FILENAME.match(caption):
        reasons.append("caption_filename")
    tags = [t for t in tokens if _TAG.match(t.strip(",.;!"))]
    n = len(tokens)
    hashtags = sum(t.startswith("#") for t in tags)
    handles = sum(t.startswith("@") for t in tags)
    urls = len(tags) - hashtags - handles
    if n and hashtags / n > cfg.max_tag_fraction:
        reasons.append("caption_hashtags")
    if n and handles / n > cfg.max_tag_fraction:
        reasons.append("caption_handles")
    if n and urls / n > cfg.max_tag_fraction:
        reasons.append("caption_urls")
    items = [i.strip().lower() for i in caption.split(",") if i.strip()]
    if len(items) >= 4:
        seo = sum(any(w in SEO_WORDS or w.isdigit() for w in i.split()) for i in items)
        if seo / len(items) > cfg.max_seo_fraction:
            reasons.append("caption_seo")
    words = [t for t in tokens if not _TAG.match(t)]
    if len(words) < cfg.caption_min_words and "caption_filename" not in reasons:
        reasons.append("caption_short")
    if len(words) > cfg.caption_max_words:
        reasons.append("caption_long")
    return reasons


def profanity_scores(captions: Sequence[str]) -> list[float]:
    """Probability of profanity per caption (alt-profanity-check; batch prediction)."""
    if not captions:
        return []
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(captions))]


@lru_cache(maxsize=4)
def _detector(codes: tuple[str, ...]):  # noqa: ANN202
    from lingua import Language, LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*[getattr(Language, SUPPORTED_LANGUAGES[c]) for c in codes]).build()


def detect_languages(captions: Sequence[str]) -> list[tuple[str | None, float]]:
    """(ISO 639-1 code or None, confidence) per caption."""
    codes = tuple(sorted(SUPPORTED_LANGUAGES))
    det = _detector(codes)
    back = {v: k for k, v in SUPPORTED_LANGUAGES.items()}
    out = []
    for text in captions:
        values = det.compute_language_confidence_values(text) if text.strip() else []
        if not values:
            out.append((None, 0.0))
            continue
        best = values[0]
        out.append((back.get(best.language.name), float(best.value)))
    return out


def caption_reasons(caption: str | None, cfg: PrefilterConfig) -> tuple[list[str], dict[str, Any]]:
    """All caption reasons for one caption, and the scores behind them (see run.py for the batch path)."""
    clean = fix_text(caption) if caption else caption
    reasons = rule_reasons(clean, cfg)
    scores: dict[str, Any] = {"caption_clean": clean, "profanity": None, "language": None, "language_confidence": None}
    if clean and cfg.profanity:
        p = profanity_scores([clean])[0]
        scores["profanity"] = p
        if p >= cfg.profanity_threshold:
            reasons.append("caption_profanity")
    if clean and cfg.languages is not None:
        lang, conf = detect_languages([clean])[0]
        scores["language"], scores["language_confidence"] = lang, conf
        if lang not in cfg.languages and conf >= cfg.language_min_confidence:
            reasons.append("caption_language")
    return reasons, scores
