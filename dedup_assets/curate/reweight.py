"""Reweighting the kept set so that its distribution over categories matches the set before filtering.

The seed: filtering shifted the model's distribution (fewer images of women after the
sexual-content filter), so the filtered set was reweighted to match the pre-filter one — if the
filter removed twice as many dog images, dog images get twice the loss weight. The categories here
are the k-means clusters we already have.

weight(image) = share of its cluster before ÷ share after, clipped to [min_weight, max_weight],
normalized to mean 1 over the kept images. Without clipping, the weighted distribution after
filtering equals the one before (total variation 0) for every cluster that kept at least one image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl


@dataclass(frozen=True)
class ReweightConfig:
    clustering: int = 0
    min_weight: float = 0.1
    max_weight: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.min_weight <= 1 <= self.max_weight:
            raise ValueError(f"need 0 < min_weight <= 1 <= max_weight, got {self.min_weight}, {self.max_weight}")


def _shares(clusters: pl.DataFrame, col: str = "cluster", weight: str | None = None) -> pl.DataFrame:
    agg = pl.col(weight).sum() if weight else pl.len()
    out = clusters.group_by(col).agg(agg.cast(pl.Float64).alias("n"))
    total = out["n"].sum()
    return out.with_columns((pl.col("n") / (total if total else 1.0)).alias("share")).select(col, "share")


def compute_weights(before_clusters: pl.DataFrame, kept_ids: pl.Series, cfg: ReweightConfig = ReweightConfig()) -> pl.DataFrame:
    """One row per kept image that has a cluster: image_id, cluster, weight (mean 1)."""
    before = before_clusters.select("image_id", "cluster")
    after = before.filter(pl.col("image_id").is_in(kept_ids.implode()))
    if after.height == 0:
        return pl.DataFrame(schema={"image_id": pl.String, "cluster": pl.Int32, "weight": pl.Float64})
    sb = _shares(before).rename({"share": "before"})
    sa = _shares(after).rename({"share": "after"})
    w = (
        after.join(sb, on="cluster").join(sa, on="cluster")
        .with_columns((pl.col("before") / pl.col("after")).clip(cfg.min_weight, cfg.max_weight).alias("weight"))
    )
    w = w.with_columns(pl.col("weight") / pl.col("weight").mean())
    return w.select("image_id", pl.col("cluster").cast(pl.Int32), pl.col("weight").cast(pl.Float64)).sort("image_id")


def total_variation(before: pl.DataFrame, after_ids: pl.Series, weights: pl.DataFrame | None = None) -> float:
    """TV distance over clusters between `before` (image_id, cluster) and the kept subset, optionally weighted."""
    sb = _shares(before).rename({"share": "b"})
    after = before.filter(pl.col("image_id").is_in(after_ids.implode()))
    if weights is not None:
        after = after.join(weights.select("image_id", "weight"), on="image_id", how="left").with_columns(
            pl.col("weight").fill_null(1.0)
        )
        sa = _shares(after, weight="weight").rename({"share": "a"})
    else:
        sa = _shares(after).rename({"share": "a"})
    j = sb.join(sa, on="cluster", how="full", coalesce=True).fill_null(0.0)
    return float(0.5 * (j["b"] - j["a"]).abs().sum())


def reweight_report(before: pl.DataFrame, kept_ids: pl.Series, weights: pl.DataFrame, cfg: ReweightConfig, top: int = 12) -> dict[str, Any]:
    """TV before/after (unweighted and weighted), the largest shifts, and a PNG plot of them."""
    after = before.filter(pl.col("image_id").is_in(kept_ids.implode()))
    sb = _shares(before).rename({"share": "share_before"})
    sa = _shares(after).rename({"share": "share_after"})
    aw = after.join(weights.select("image_id", "weight"), on="image_id", how="left").with_columns(pl.col("weight").fill_null(1.0))
    sw = _shares(aw, weight="weight").rename({"share": "share_after_weighted"})
    shifts = (
        sb.join(sa, on="cluster", how="left").join(sw, on="cluster", how="left").fill_null(0.0)
        .with_columns((pl.col("share_after") - pl.col("share_before")).abs().alias("shift"))
        .sort("shift", descending=True).head(top)
    )
    return {
        "tv_unweighted": total_variation(before, kept_ids),
        "tv_weighted": total_variation(before, kept_ids, weights),
        "top_shifts": shifts,
        "plot_png": _plot(shifts) if shifts.height else None,
        "config": {"clustering": cfg.clustering, "min_weight": cfg.min_weight, "max_weight": cfg.max_weight},
    }


def _plot(shifts: pl.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(shifts.height)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
    ax.bar(x - 0.27, shifts["share_before"], 0.27, label="before filtering")
    ax.bar(x, shifts["share_after"], 0.27, label="after, unweighted")
    ax.bar(x + 0.27, shifts["share_after_weighted"], 0.27, label="after, weighted")
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in shifts["cluster"].to_list()], fontsize=7)
    ax.set_xlabel("cluster (largest shifts)")
    ax.set_ylabel("share")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
