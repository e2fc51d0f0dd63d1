"""Which indexed images survive, and why every other one was removed.

Grain: `kept` has one row per surviving image; `removed` one row per removed file; together they
hold every row of the index exactly once. Precedence of reasons: decode > filter > duplicate.

Dedup and filtering are independent masks (as in the seed pipeline): a keeper that fails a filter
is removed by the filter, and its duplicates still point at it as `duplicate_of:<keeper>` — they
are copies of an image we decided not to train on, so they go too.
"""

from __future__ import annotations

from typing import Any

import polars as pl

KEPT_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "location": pl.String,
    "caption": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "weight": pl.Float64,
}
REMOVED_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "shard": pl.String,
    "reason": pl.String,
    "detail": pl.String,
}


def select(
    index: pl.DataFrame,
    prefilter: pl.DataFrame | None,
    groups: pl.DataFrame | None,
    embedded_ids: pl.Series | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split the index into kept rows (weight 1.0 for now) and removed rows with a reason."""
    df = index.select("image_id", "shard", "key", "location", "caption", "width", "height", "status")
    if prefilter is not None and prefilter.height:
        pf = prefilter.select(
            "image_id",
            pl.col("passed").alias("_passed"),
            pl.col("reasons").list.join(",").alias("_reasons"),
            pl.col("reasons").list.first().alias("_first"),
        )
        df = df.join(pf, on="image_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.Boolean).alias("_passed"), pl.lit(None, pl.String).alias("_reasons"),
                             pl.lit(None, pl.String).alias("_first"))
    if groups is not None and groups.height:
        dup = groups.filter(~pl.col("is_keeper")).select(
            "image_id",
            pl.col("group_id").alias("_keeper"),
            pl.col("similarity_to_keeper").cast(pl.Float64).alias("_sim"),
        )
        df = df.join(dup, on="image_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.String).alias("_keeper"), pl.lit(None, pl.Float64).alias("_sim"))
    if embedded_ids is not None:
        df = df.with_columns(pl.col("image_id").is_in(embedded_ids.implode()).alias("_embedded"))
    else:
        df = df.with_columns(pl.lit(True).alias("_embedded"))

    reason = (
        pl.when(pl.col("status") != "ok").then(pl.lit("decode:") + pl.col("status"))
        .when(pl.col("_passed") == False).then(pl.lit("filter:") + pl.col("_first").fill_null("unknown"))  # noqa: E712
        .when(pl.col("_keeper").is_not_null()).then(pl.lit("duplicate_of:") + pl.col("_keeper"))
        .when(~pl.col("_embedded")).then(pl.lit("no_embedding:not_embedded"))
        .otherwise(None)
    )
    detail = (
        pl.when(pl.col("status") != "ok").then(pl.lit(None, pl.String))
        .when(pl.col("_passed") == False).then(pl.col("_reasons"))  # noqa: E712
        .when(pl.col("_keeper").is_not_null()).then(pl.format("similarity={}", pl.col("_sim").round(4)))
        .otherwise(None)
    )
    df = df.with_columns(reason.alias("reason"), detail.alias("detail"))
    kept = (
        df.filter(pl.col("reason").is_null())
        .with_columns(pl.lit(1.0).alias("weight"))
        .select([pl.col(c).cast(t) for c, t in KEPT_SCHEMA.items()])
        .sort("image_id")
    )
    removed = (
        df.filter(pl.col("reason").is_not_null())
        .select([pl.col(c).cast(t) for c, t in REMOVED_SCHEMA.items()])
        .sort("image_id")
    )
    ok, details = check_accounting(index, kept, removed)
    if not ok:
        raise AssertionError(f"kept + removed does not equal the index: {details}")
    return kept, removed


def check_accounting(index: pl.DataFrame, kept: pl.DataFrame, removed: pl.DataFrame) -> tuple[bool, dict[str, Any]]:
    """kept + removed == indexed, exactly: same id set, disjoint, no duplicates."""
    ids = set(index["image_id"].to_list())
    k = kept["image_id"].to_list()
    r = removed["image_id"].to_list()
    both = set(k) & set(r)
    missing = ids - set(k) - set(r)
    extra = (set(k) | set(r)) - ids
    dup = len(k) - len(set(k)) + len(r) - len(set(r))
    details = {
        "indexed": len(ids),
        "kept": len(k),
        "removed": len(r),
        "in_both": sorted(both)[:20],
        "missing": sorted(missing)[:20],
        "unknown": sorted(extra)[:20],
        "duplicated_rows": dup,
    }
    ok = not both and not missing and not extra and dup == 0 and len(k) + len(r) == len(ids)
    return ok, details
