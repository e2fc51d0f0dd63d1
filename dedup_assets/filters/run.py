"""Run every pre-filter over one shard's index frame.

Grain: one row per index row (every file of the shard): passed, every reason it failed, and the
scores behind the reasons. Rows that did not decode fail with `decode:<status>`. An exception in
one filter on one row is recorded as `error:<filter>` for that row; it never stops the run or
drops rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import polars as pl
from PIL import Image

from dedup_assets.filters.caption import detect_languages, fix_text, profanity_scores, rule_reasons
from dedup_assets.filters.config import PrefilterConfig, check_dependencies
from dedup_assets.filters.image import image_reasons

PREFILTER_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "shard": pl.String,
    "passed": pl.Boolean,
    "reasons": pl.List(pl.String),
    "caption_clean": pl.String,
    "profanity": pl.Float32,
    "language": pl.String,
    "language_confidence": pl.Float32,
    "nsfw": pl.Float32,
}


def _safe(fn: Callable, default: Any, name: str, errors: list[str]) -> Any:
    try:
        return fn()
    except Exception:  # one broken row must not sink the shard
        errors.append(f"error:{name}")
        return default


def run_prefilter(
    index: pl.DataFrame,
    cfg: PrefilterConfig,
    load_image: Callable[[str], Image.Image] | None = None,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    check_dependencies(cfg)
    rows = index.to_dicts()
    ok_rows = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    reasons: list[list[str]] = [[] for _ in rows]
    clean: list[str | None] = [None] * len(rows)
    prof: list[float | None] = [None] * len(rows)
    lang: list[str | None] = [None] * len(rows)
    conf: list[float | None] = [None] * len(rows)
    nsfw: list[float | None] = [None] * len(rows)

    for i, r in enumerate(rows):
        if r["status"] != "ok":
            reasons[i].append(f"decode:{r['status']}")
            continue
        errs: list[str] = []
        reasons[i] += _safe(lambda: image_reasons(r["format"], r["width"], r["height"], r["bytes"], cfg), [], "image", errs)
        clean[i] = _safe(lambda: fix_text(r["caption"]) if r["caption"] else r["caption"], r["caption"], "mojibake", errs)
        reasons[i] += _safe(lambda: rule_reasons(clean[i], cfg), [], "caption", errs)
        reasons[i] += errs

    texted = [i for i in ok_rows if clean[i]]
    if cfg.profanity and texted:
        try:
            for i, p in zip(texted, profanity_scores([clean[i] for i in texted])):
                prof[i] = p
                if p >= cfg.profanity_threshold:
                    reasons[i].append("caption_profanity")
        except Exception as e:
            for i in texted:
                reasons[i].append("error:profanity")
            if log:
                log(f"profanity filter failed on this shard: {type(e).__name__}: {e}")
    if cfg.languages is not None and texted:
        try:
            for i, (code, c) in zip(texted, detect_languages([clean[i] for i in texted])):
                lang[i], conf[i] = code, c
                if code not in cfg.languages and c >= cfg.language_min_confidence:
                    reasons[i].append("caption_language")
        except Exception as e:
            for i in texted:
                reasons[i].append("error:language")
            if log:
                log(f"language filter failed on this shard: {type(e).__name__}: {e}")
    if cfg.nsfw and ok_rows:
        from dedup_assets.filters.content import get_scorer

        if load_image is None:
            raise ValueError("the nsfw filter needs load_image(location) -> RGB image")
        scorer = get_scorer()
        for i in ok_rows:
            errs = []
            score = _safe(lambda: float(scorer.score([load_image(rows[i]["location"])])[0]), None, "nsfw", errs)
            reasons[i] += errs
            nsfw[i] = score
            if score is not None and score >= cfg.nsfw_threshold:
                reasons[i].append("nsfw")
    if log:
        log(f"pre-filtered {len(rows)} rows: {sum(not r for r in reasons)} passed")
    return pl.DataFrame(
        {
            "image_id": [r["image_id"] for r in rows],
            "shard": [r["shard"] for r in rows],
            "passed": [not r for r in reasons],
            "reasons": reasons,
            "caption_clean": clean,
            "profanity": prof,
            "language": lang,
            "language_confidence": conf,
            "nsfw": nsfw,
        },
        schema=PREFILTER_SCHEMA,
    )


def summarize_prefilter(df: pl.DataFrame, examples_per_reason: int = 3) -> dict[str, Any]:
    """Counts removed per reason and a few example ids (with their caption) per reason."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    if df.height:
        for r in df.filter(~pl.col("passed")).select("image_id", "reasons", "caption_clean").iter_rows(named=True):
            for reason in r["reasons"]:
                counts[reason] += 1
                ex = examples.setdefault(reason, [])
                if len(ex) < examples_per_reason:
                    ex.append(f"{r['image_id']}: {(r['caption_clean'] or '')[:60]}")
    return {"removed_by_reason": dict(counts), "examples": examples}
