"""Which indexed images survive, and why every other one was removed.

Grain: `kept` has one row per surviving image (KEPT_SCHEMA); `removed` one row per removed file
(REMOVED_SCHEMA); together they hold every row of the index exactly once.

Reasons, in order of precedence (the first that applies wins, so every file has exactly one):
1. `decode:<status>`          the file did not decode (index status other than "ok"); detail = error.
2. `filter:<first reason>`    a pre-filter failed; detail = all reasons joined with ",".
3. `duplicate_of:<keeper id>` a non-keeper member of a duplicate group; detail = "similarity=0.9731".
4. `no_embedding:<why>`       an ok image with no embedding row (only when `embedded_ids` is given);
                              why = the embedder's failure reason when known, else "not_embedded".

Dedup and filtering are independent masks, as in the seed pipeline: a keeper that fails a filter is
removed by the filter, and its duplicates still point at it as `duplicate_of:<keeper>` — they are
copies of an image we decided not to train on, so they go too (no new keeper is promoted).

A missing pre-filter table, or an image absent from it, counts as passed; an image absent from the
duplicate groups is unique.
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

_INDEX_COLUMNS = ("image_id", "shard", "key", "location", "caption", "width", "height", "status")


def _require(df: pl.DataFrame, cols: tuple[str, ...] | list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {df.columns}")


def _keeper_of(groups: pl.DataFrame) -> pl.DataFrame:
    """image_id → keeper image_id and similarity, for every non-keeper member of a group.

    The keeper is looked up through `is_keeper` rather than assumed to equal `group_id`, so this
    holds for any group labelling.
    """
    keepers = groups.filter(pl.col("is_keeper")).select("group_id", pl.col("image_id").alias("_keeper"))
    bad = keepers.group_by("group_id").len().filter(pl.col("len") != 1)
    no_keeper = groups.select("group_id").unique().join(keepers, on="group_id", how="anti")
    if bad.height or no_keeper.height:
        raise ValueError(
            "every duplicate group needs exactly one keeper: "
            f"{bad.height} group(s) have several (e.g. {bad['group_id'].head(3).to_list()}), "
            f"{no_keeper.height} have none (e.g. {no_keeper['group_id'].head(3).to_list()}); "
            "rebuild duplicate_groups"
        )
    return (
        groups.filter(~pl.col("is_keeper"))
        .select("image_id", "group_id", pl.col("similarity_to_keeper").cast(pl.Float64).alias("_sim"))
        .join(keepers, on="group_id", how="left")
        .drop("group_id")
    )


def select(
    index: pl.DataFrame,
    prefilter: pl.DataFrame | None,
    groups: pl.DataFrame | None,
    embedded_ids: pl.Series | None = None,
    embedding_failures: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split the index into kept rows (weight 1.0, set later by reweighting) and removed rows.

    `index`: one row per file (image_index). `prefilter`: image_id, passed, reasons (or None).
    `groups`: duplicate_groups rows (or None). `embedded_ids`: ids that have an embedding (or None
    to skip that check). `embedding_failures`: optional image_id, reason frame naming why an image
    has no embedding. Both outputs are sorted by image_id. Raises AssertionError when
    kept + removed would not equal the index (e.g. duplicate image_ids in an input).
    """
    _require(index, _INDEX_COLUMNS, "index")
    error = pl.col("error") if "error" in index.columns else pl.lit(None)
    df = index.select(*_INDEX_COLUMNS, error.cast(pl.String).alias("_error"))

    if prefilter is not None:
        _require(prefilter, ("image_id", "passed", "reasons"), "prefilter")
        pf = prefilter.select(
            "image_id",
            pl.col("passed").alias("_passed"),
            pl.col("reasons").list.join(",").alias("_reasons"),
            pl.col("reasons").list.first().alias("_first"),
        )
        df = df.join(pf, on="image_id", how="left")
    else:
        df = df.with_columns(
            pl.lit(None, pl.Boolean).alias("_passed"),
            pl.lit(None, pl.String).alias("_reasons"),
            pl.lit(None, pl.String).alias("_first"),
        )

    if groups is not None:
        _require(groups, ("image_id", "group_id", "is_keeper", "similarity_to_keeper"), "groups")
        df = df.join(_keeper_of(groups), on="image_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.String).alias("_keeper"), pl.lit(None, pl.Float64).alias("_sim"))

    if embedded_ids is not None:
        df = df.with_columns(pl.col("image_id").is_in(embedded_ids.cast(pl.String).implode()).alias("_embedded"))
    else:
        df = df.with_columns(pl.lit(True).alias("_embedded"))
    if embedding_failures is not None and embedding_failures.height:
        why = embedding_failures.select("image_id", pl.col("reason").cast(pl.String).alias("_why")).unique(
            "image_id", keep="first"
        )
        df = df.join(why, on="image_id", how="left")
    else:
        df = df.with_columns(pl.lit(None, pl.String).alias("_why"))

    # A null status is not "ok": such a row never reached decoding, so it cannot be trained on.
    not_ok = pl.col("status").is_null() | (pl.col("status") != "ok")
    failed_filter = pl.col("_passed").fill_null(True).not_()
    is_dup = pl.col("_keeper").is_not_null()
    no_emb = pl.col("_embedded").not_()
    reason = (
        pl.when(not_ok).then(pl.lit("decode:") + pl.col("status").fill_null("unknown"))
        .when(failed_filter).then(pl.lit("filter:") + pl.col("_first").fill_null("unknown"))
        .when(is_dup).then(pl.lit("duplicate_of:") + pl.col("_keeper"))
        .when(no_emb).then(pl.lit("no_embedding:") + pl.col("_why").fill_null("not_embedded"))
        .otherwise(pl.lit(None, pl.String))
    )
    detail = (
        pl.when(not_ok).then(pl.col("_error"))
        .when(failed_filter).then(pl.col("_reasons"))
        .when(is_dup).then(pl.format("similarity={}", pl.col("_sim").round(4)))
        .otherwise(pl.lit(None, pl.String))
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
    """kept + removed == index, exactly: the same id set, disjoint, and no id twice anywhere.

    Returns (passed, details); details hold counts and up to 20 example ids per kind of problem,
    ready to be Dagster check metadata.
    """
    ids = index.select(pl.col("image_id").cast(pl.String))
    k = kept.select(pl.col("image_id").cast(pl.String))
    r = removed.select(pl.col("image_id").cast(pl.String))
    both = k.join(r, on="image_id", how="semi").unique()
    out = pl.concat([k, r])
    missing = ids.join(out, on="image_id", how="anti").unique()
    extra = out.join(ids, on="image_id", how="anti").unique()
    dup_rows = (
        (ids.height - ids.n_unique())
        + (k.height - k.n_unique())
        + (r.height - r.n_unique())
    )

    def sample(df: pl.DataFrame) -> list[str]:
        return df["image_id"].sort().head(20).to_list()

    details: dict[str, Any] = {
        "indexed": ids.height,
        "kept": k.height,
        "removed": r.height,
        "in_both": sample(both),
        "missing": sample(missing),
        "unknown": sample(extra),
        "duplicated_rows": int(dup_rows),
    }
    ok = (
        both.height == 0
        and missing.height == 0
        and extra.height == 0
        and dup_rows == 0
        and k.height + r.height == ids.height
    )
    return ok, details
