"""Run every pre-filter over one shard's index frame.

Grain: one output row per index row (every file of the shard, decodable or not): whether it
passed, every reason it failed, and the scores behind the reasons (PREFILTER_SCHEMA).

Rows without image data (external embeddings, `has_image_data`) get the caption rules only, plus
the size rules when the metadata gave width and height.

Order and cost: rows that did not decode fail with `decode:<status>` and nothing else runs on
them. The image rules and caption rules are pure and cheap; the profanity and language models
each score all captions in one batch call; the NSFW detector, the only filter that reads pixels,
runs last and only on rows that passed everything else (its score is null on the others).

Failure isolation: an exception inside one filter on one row is recorded as `error:<filter>`
(image, caption, profanity, language, nsfw) on that row, which then does not pass; it never
stops the run or drops rows. When a batch call raises, the batch is retried row by row so that
only the rows that really fail are marked. Configuration errors (a missing package, nsfw without
`load_image`) are raised before any work.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import polars as pl
from PIL import Image

from dedup_assets.filters.caption import (
    fix_caption,
    language_fails,
    language_scores,
    language_text,
    profanity_fails,
    profanity_scores,
    rule_reasons,
    tokenize_caption,
)
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
REQUIRED_COLUMNS = ("image_id", "shard", "location", "caption", "bytes", "format", "width", "height", "status")

T = TypeVar("T")
R = TypeVar("R")


class _Errors:
    """Counts failures per filter and keeps the first message of each, for one log line."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, name: str, exc: BaseException) -> None:
        self.count[name] = self.count.get(name, 0) + 1
        self.first.setdefault(name, f"{type(exc).__name__}: {exc}")


def _batched(
    fn: Callable[[list[T]], Sequence[R]], items: list[T], name: str, errors: _Errors
) -> list[R | Exception]:
    """fn over all items in one call; if that raises, one call per item, so one bad item only
    costs itself. Returns a result or the exception for each item."""
    if not items:
        return []
    try:
        out = list(fn(items))
        if len(out) != len(items):
            raise RuntimeError(f"{name} returned {len(out)} results for {len(items)} inputs")
        return out
    except Exception:  # retried per item below; the per-item failures are what gets recorded
        pass
    results: list[R | Exception] = []
    for item in items:
        try:
            results.append(list(fn([item]))[0])
        except Exception as e:  # one broken row must not sink the shard
            errors.add(name, e)
            results.append(e)
    return results


def has_image_data(fmt: str | None, file_bytes: int | None) -> bool:
    """False for rows without an image file (external embeddings: no format, no byte count).

    On those rows the image-only rules are skipped: format and file size always, minimum side and
    aspect ratio unless the metadata gave width and height, and the NSFW detector (no pixels).
    """
    return not (fmt is None and file_bytes is None)


def run_prefilter(
    index: pl.DataFrame,
    cfg: PrefilterConfig,
    load_image: Callable[[str], Image.Image] | None = None,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Apply the image, caption and content filters to one index frame; one row per index row,
    in the index's order, with PREFILTER_SCHEMA's columns.

    `load_image(location)` must return a PIL image (converted to RGB here); it is only called
    when `cfg.nsfw` is on, and a ~320-px decode is enough (the detector works at 320 px).
    """
    check_dependencies(cfg)
    missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"the index frame lacks columns {missing}; pass the image_index frame of one shard")
    if cfg.nsfw and load_image is None:
        raise ValueError("nsfw=True needs load_image(location) -> PIL image; pass one or set nsfw=False")

    n = index.height
    col = {c: index.get_column(c).to_list() for c in REQUIRED_COLUMNS}
    errors = _Errors()
    reasons: list[list[str]] = [[] for _ in range(n)]
    clean: list[str | None] = [None] * n
    prof: list[float | None] = [None] * n
    lang: list[str | None] = [None] * n
    conf: list[float | None] = [None] * n
    nsfw: list[float | None] = [None] * n
    words: list[str | None] = [None] * n

    ok: list[int] = []
    for i in range(n):
        status = col["status"][i]
        if status != "ok":
            reasons[i].append(f"decode:{status or 'unknown'}")
            continue
        ok.append(i)
        try:
            if has_image_data(col["format"][i], col["bytes"][i]):
                reasons[i] += image_reasons(col["format"][i], col["width"][i], col["height"][i], col["bytes"][i], cfg)
            elif col["width"][i] is not None and col["height"][i] is not None:
                # external embeddings with a known size: the size rules apply, the format/file rules cannot
                reasons[i] += [r for r in image_reasons(None, col["width"][i], col["height"][i], None, cfg)
                               if r != "format"]
        except Exception as e:
            errors.add("image", e)
            reasons[i].append("error:image")
        try:
            clean[i] = fix_caption(col["caption"][i])
            tokens = tokenize_caption(clean[i]) if clean[i] and clean[i].strip() else None
            reasons[i] += rule_reasons(clean[i], cfg, tokens)
            if tokens is not None:
                words[i] = language_text(clean[i], tokens)  # tokenized once, for the rules and the detector
        except Exception as e:
            errors.add("caption", e)
            reasons[i].append("error:caption")
            clean[i] = clean[i] if clean[i] is not None else col["caption"][i]

    texted = [i for i in ok if clean[i]]
    if cfg.profanity and texted:
        texts = [clean[i] for i in texted]
        results = _batched(lambda ts: profanity_scores(ts).tolist(), texts, "profanity", errors)
        for i, p in zip(texted, results):
            if isinstance(p, Exception):
                reasons[i].append("error:profanity")
                continue
            prof[i] = float(p)
            if profanity_fails(prof[i], cfg):
                reasons[i].append("caption_profanity")

    if cfg.languages is not None and texted:
        judged: list[int] = []
        texts = []
        for i in texted:
            if "error:caption" in reasons[i]:  # the tokenizer below is what just broke on this row
                continue
            try:
                text = words[i] if words[i] is not None else language_text(clean[i])
            except Exception as e:
                errors.add("language", e)
                reasons[i].append("error:language")
                continue
            if text:  # tags and file names only: nothing for the detector to judge
                judged.append(i)
                texts.append(text)
        results = _batched(lambda ts: language_scores(ts, cfg), texts, "language", errors)
        for i, s in zip(judged, results):
            if isinstance(s, Exception):
                reasons[i].append("error:language")
                continue
            if s.language is not None:
                lang[i], conf[i] = s.language, s.confidence
            if language_fails(s, cfg):
                reasons[i].append("caption_language")

    if cfg.nsfw:
        assert load_image is not None
        from dedup_assets.filters.content import get_scorer

        scorer = get_scorer(cfg.nsfw_batch_size)
        todo = [i for i in ok if not reasons[i] and has_image_data(col["format"][i], col["bytes"][i])]
        for start in range(0, len(todo), cfg.nsfw_batch_size):
            rows, images = [], []
            for i in todo[start : start + cfg.nsfw_batch_size]:
                try:
                    images.append(load_image(col["location"][i]).convert("RGB"))
                    rows.append(i)
                except Exception as e:
                    errors.add("nsfw", e)
                    reasons[i].append("error:nsfw")
            results = _batched(lambda ims: scorer.score(ims).tolist(), images, "nsfw", errors)
            for i, s in zip(rows, results):
                if isinstance(s, Exception):
                    reasons[i].append("error:nsfw")
                    continue
                nsfw[i] = float(s)
                if s >= cfg.nsfw_threshold:
                    reasons[i].append("nsfw")

    passed = [not r for r in reasons]
    if log:
        log(f"pre-filtered {n} rows: {sum(passed)} passed, {n - sum(passed)} removed")
        for name, count in errors.count.items():
            log(f"filter {name!r} raised on {count} row(s), recorded as error:{name}; first: {errors.first[name]}")
    return pl.DataFrame(
        {
            "image_id": col["image_id"],
            "shard": col["shard"],
            "passed": passed,
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
    """Counts for run metadata: rows, passed, removed, removed per reason (a row with two reasons
    counts under both; most frequent first) and the first few examples of each reason (image_id
    and cleaned caption, in image_id order)."""
    if examples_per_reason < 0:
        raise ValueError(f"examples_per_reason must be >= 0, got {examples_per_reason}")
    passed = int(df["passed"].sum()) if df.height else 0
    exploded = (
        df.filter(~pl.col("passed"))
        .select("image_id", "caption_clean", pl.col("reasons").alias("reason"))
        .explode("reason")
        .drop_nulls("reason")
    )
    counts = exploded.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    examples: dict[str, list[dict[str, str | None]]] = {}
    if examples_per_reason:
        firsts = exploded.sort("image_id").group_by("reason", maintain_order=True).head(examples_per_reason)
        for row in firsts.iter_rows(named=True):
            example = {"image_id": row["image_id"], "caption": row["caption_clean"]}
            examples.setdefault(row["reason"], []).append(example)
    return {
        "rows": df.height,
        "passed": passed,
        "removed": df.height - passed,
        "removed_by_reason": dict(counts.iter_rows()),
        "examples": {reason: examples.get(reason, []) for reason in counts["reason"].to_list()},
    }
