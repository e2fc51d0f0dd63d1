"""Reweighting the kept set so that its distribution over categories matches the set before filtering.

The seed: filtering shifted the model's distribution (fewer images of women after the
sexual-content filter), so the filtered set was reweighted to match the pre-filter one — if the
filter removed twice as many dog images, dog images get twice the loss weight. The categories here
are the k-means clusters we already have (one clustering, `ReweightConfig.clustering`).

weight(image in cluster c) = clip(s · share_before(c) / share_after(c), min_weight, max_weight),
with the single scale s chosen so that the weights average exactly 1 over the kept images. When no
bound binds this is the plain ratio normalized to mean 1, and the weighted distribution after
filtering equals the one before (total variation 0) — except for clusters that lost every image,
whose share nothing can restore. Solving for s (rather than clipping and then dividing by the mean)
keeps both promises at once: every weight inside the bounds and mean 1.

"Before" means every image considered before filtering: every ok image with an embedding (so
every image that has a cluster). Kept images without a cluster get no row here; the caller gives
them weight 1.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

WEIGHTS_SCHEMA: dict[str, pl.DataType] = {"image_id": pl.String, "cluster": pl.Int32, "weight": pl.Float64}


@dataclass(frozen=True)
class ReweightConfig:
    """Which clustering defines the categories, and the bounds on a loss weight."""

    clustering: int = 0
    min_weight: float = 0.1
    max_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.clustering < 0:
            raise ValueError(f"clustering must be >= 0 (an index 0..C-1), got {self.clustering}")
        if not 0 < self.min_weight <= 1 <= self.max_weight:
            raise ValueError(
                "need 0 < min_weight <= 1 <= max_weight so that mean-1 weights exist; got "
                f"min_weight={self.min_weight}, max_weight={self.max_weight}"
            )


def _before_frame(before: pl.DataFrame, cfg: ReweightConfig | None = None) -> pl.DataFrame:
    """image_id, cluster for one clustering, checked to hold each image once."""
    if "clustering" in before.columns:
        clustering = cfg.clustering if cfg is not None else None
        n = before["clustering"].n_unique()
        if clustering is not None:
            before = before.filter(pl.col("clustering") == clustering)
        elif n > 1:
            raise ValueError("`before` holds several clusterings; filter it to one or pass a ReweightConfig")
    out = before.select(pl.col("image_id").cast(pl.String), pl.col("cluster").cast(pl.Int64))
    if out.height != out["image_id"].n_unique():
        raise ValueError(
            "`before` lists some image_id more than once; pass one row per image for a single "
            "clustering (e.g. clusterings filtered to clustering = c)"
        )
    return out


def _kept_ids(ids: pl.Series | list[str] | set[str]) -> pl.Series:
    s = ids if isinstance(ids, pl.Series) else pl.Series("image_id", sorted(ids), dtype=pl.String)
    return s.cast(pl.String).implode()


def _shares(frame: pl.DataFrame, name: str, weight: str | None = None) -> pl.DataFrame:
    """cluster, <name>: each cluster's share of the (weighted) count."""
    agg = pl.col(weight).sum() if weight else pl.len()
    out = frame.group_by("cluster").agg(agg.cast(pl.Float64).alias("n"))
    total = float(out["n"].sum()) if out.height else 0.0
    return out.select("cluster", (pl.col("n") / (total if total > 0 else 1.0)).alias(name))


def _solve_scale(ratio: np.ndarray, count: np.ndarray, lo: float, hi: float) -> float:
    """The s with Σ count·clip(s·ratio, lo, hi) = Σ count (mean weight 1).

    The left side is continuous and non-decreasing in s, from lo·N (s→0) to hi·N (s→∞), and
    lo ≤ 1 ≤ hi, so a root exists; bisection on log s finds it to machine precision.
    """
    n = count.sum()

    def mean(s: float) -> float:
        return float((count * np.clip(s * ratio, lo, hi)).sum() / n)

    a, b = 1.0, 1.0
    while mean(a) > 1.0:
        a /= 2.0
    while mean(b) < 1.0:
        b *= 2.0
    for _ in range(200):
        m = (a * b) ** 0.5
        if mean(m) < 1.0:
            a = m
        else:
            b = m
        if b - a <= 1e-13 * b:
            break
    s = (a * b) ** 0.5
    # Exact finish: with the clipped clusters known, the mean is linear in s over the free ones.
    w = s * ratio
    low, high = w <= lo, w >= hi
    free = ~(low | high)
    if free.any():
        fixed = (count[low] * lo).sum() + (count[high] * hi).sum()
        exact = (n - fixed) / (count[free] * ratio[free]).sum()
        w2 = exact * ratio
        if ((w2[free] >= lo) & (w2[free] <= hi)).all() and (w2[low] <= lo).all() and (w2[high] >= hi).all():
            s = float(exact)
    return s


COUNTS_SCHEMA: dict[str, pl.DataType] = {"cluster": pl.Int64, "before": pl.Int64, "after": pl.Int64}


def cluster_weights(counts: pl.DataFrame, cfg: ReweightConfig = ReweightConfig()) -> pl.DataFrame:
    """cluster, weight for every cluster that kept an image (mean exactly 1 over kept images).

    `counts`: cluster, before (images in the cluster before filtering), after (of those, kept) —
    one row per cluster, the only input that grows with the number of clusters rather than images,
    so the table layer can count in SQL and hand this over.
    """
    per = counts.select(
        pl.col("cluster").cast(pl.Int64), pl.col("before").cast(pl.Float64), pl.col("after").cast(pl.Float64)
    )
    if per["cluster"].n_unique() != per.height:
        raise ValueError("counts must hold one row per cluster")
    total_before, total_after = float(per["before"].sum()), float(per["after"].sum())
    per = per.filter(pl.col("after") > 0).sort("cluster")
    if per.height == 0:
        return pl.DataFrame(schema={"cluster": pl.Int64, "weight": pl.Float64})
    ratio = ((per["before"] / total_before) / (per["after"] / total_after)).to_numpy()
    s = _solve_scale(ratio, per["after"].to_numpy(), cfg.min_weight, cfg.max_weight)
    return per.select("cluster", pl.Series("weight", np.clip(s * ratio, cfg.min_weight, cfg.max_weight)))


def _counts(before: pl.DataFrame, kept_ids: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
    after = before.filter(pl.col("image_id").is_in(_kept_ids(kept_ids)))
    counts = (
        before.group_by("cluster").len("before")
        .join(after.group_by("cluster").len("after"), on="cluster", how="left")
        .with_columns(pl.col("after").fill_null(0))
    )
    return counts, after


def compute_weights(
    before_clusters: pl.DataFrame, kept_ids: pl.Series, cfg: ReweightConfig = ReweightConfig()
) -> pl.DataFrame:
    """One row per kept image that has a cluster: image_id, cluster, weight (mean exactly 1).

    `before_clusters`: image_id, cluster (and optionally clustering, then filtered to
    cfg.clustering) for every image considered before filtering. Sorted by image_id. The
    per-image form of `cluster_weights`, for callers that hold the frames.
    """
    before = _before_frame(before_clusters, cfg)
    counts, after = _counts(before, kept_ids)
    if after.height == 0:
        return pl.DataFrame(schema=WEIGHTS_SCHEMA)
    per = cluster_weights(counts, cfg)
    return (
        after.join(per, on="cluster")
        .select(pl.col("image_id"), pl.col("cluster").cast(pl.Int32), pl.col("weight").cast(pl.Float64))
        .sort("image_id")
    )


def _after_shares(before: pl.DataFrame, after_ids: pl.Series, weights: pl.DataFrame | None, name: str) -> pl.DataFrame:
    after = before.filter(pl.col("image_id").is_in(_kept_ids(after_ids)))
    if weights is None:
        return _shares(after, name)
    # Kept images without a weight row train with weight 1, as the caller fills them.
    after = after.join(weights.select("image_id", "weight"), on="image_id", how="left").with_columns(
        pl.col("weight").fill_null(1.0)
    )
    return _shares(after, name, weight="weight")


def total_variation(before: pl.DataFrame, after_ids: pl.Series, weights: pl.DataFrame | None = None) -> float:
    """Total-variation distance (½ Σ |p − q|, in [0, 1]) over clusters between the distribution of
    `before` (image_id, cluster) and that of its subset `after_ids`, weighted by `weights`
    (image_id, weight) when given."""
    b = _before_frame(before)
    j = (
        _shares(b, "p")
        .join(_after_shares(b, after_ids, weights, "q"), on="cluster", how="full", coalesce=True)
        .fill_null(0.0)
    )
    return float(0.5 * (j["p"] - j["q"]).abs().sum())


def report_from_counts(
    counts: pl.DataFrame, weights: pl.DataFrame, cfg: ReweightConfig = ReweightConfig(), top: int = 12
) -> dict[str, Any]:
    """What reweighting did, from per-cluster counts (cluster, before, after) and the per-cluster
    weights of `cluster_weights` (a kept cluster without a weight counts with weight 1).

    Keys: tv_unweighted, tv_weighted (≈ 0 when no bound binds and no cluster was emptied),
    clusters_emptied (clusters with images before and none after), clipped_low / clipped_high
    (kept images whose weight sits at a bound), top_shifts (frame: cluster, share_before,
    share_after, share_after_weighted, shift — the `top` largest |after − before|), plot_png
    (PNG bytes of those shifts, None when there are no clusters) and config.
    """
    per = (
        counts.select(pl.col("cluster").cast(pl.Int64), pl.col("before").cast(pl.Float64), pl.col("after").cast(pl.Float64))
        .join(weights.select(pl.col("cluster").cast(pl.Int64), "weight"), on="cluster", how="left")
        .with_columns(pl.col("weight").fill_null(1.0))
        .with_columns((pl.col("after") * pl.col("weight")).alias("after_w"))
    )

    def share(col: str) -> pl.Expr:
        total = float(per[col].sum()) if per.height else 0.0
        return pl.col(col) / (total if total > 0 else 1.0)

    shifts = (
        per.with_columns(
            share("before").alias("share_before"), share("after").alias("share_after"),
            share("after_w").alias("share_after_weighted"),
        )
        .with_columns((pl.col("share_after") - pl.col("share_before")).abs().alias("shift"))
        .sort(["shift", "cluster"], descending=[True, False])
    )
    eps = 1e-12
    kept = shifts.filter(pl.col("after") > 0)
    top_shifts = shifts.head(top).select(
        pl.col("cluster").cast(pl.Int32), "share_before", "share_after", "share_after_weighted", "shift"
    )
    return {
        "tv_unweighted": float(0.5 * (shifts["share_before"] - shifts["share_after"]).abs().sum()),
        "tv_weighted": float(0.5 * (shifts["share_before"] - shifts["share_after_weighted"]).abs().sum()),
        "clusters_emptied": int(shifts.filter((pl.col("before") > 0) & (pl.col("after") == 0)).height),
        "clipped_low": int(kept.filter(pl.col("weight") <= cfg.min_weight + eps)["after"].sum()),
        "clipped_high": int(kept.filter(pl.col("weight") >= cfg.max_weight - eps)["after"].sum()),
        "top_shifts": top_shifts,
        "plot_png": _plot(top_shifts) if top_shifts.height else None,
        "config": {"clustering": cfg.clustering, "min_weight": cfg.min_weight, "max_weight": cfg.max_weight},
    }


def reweight_report(
    before: pl.DataFrame,
    kept_ids: pl.Series,
    weights: pl.DataFrame,
    cfg: ReweightConfig = ReweightConfig(),
    top: int = 12,
) -> dict[str, Any]:
    """`report_from_counts` for callers that hold the frames (`weights` from `compute_weights`)."""
    b = _before_frame(before, cfg)
    counts, _ = _counts(b, kept_ids)
    per = weights.group_by("cluster").agg(pl.col("weight").first()) if weights.height else weights.select("cluster", "weight")
    return report_from_counts(counts, per, cfg, top)


def _plot(shifts: pl.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(shifts.height)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
    ax.bar(x - 0.27, shifts["share_before"].to_numpy(), 0.27, label="before filtering")
    ax.bar(x, shifts["share_after"].to_numpy(), 0.27, label="after, unweighted")
    ax.bar(x + 0.27, shifts["share_after_weighted"].to_numpy(), 0.27, label="after, weighted")
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in shifts["cluster"].to_list()], fontsize=7)
    ax.set_xlabel("cluster (largest shifts first)")
    ax.set_ylabel("share of images")
    ax.set_title("cluster shares before and after filtering")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
