"""Known-answer tests for cluster reweighting and the total-variation measure."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dedup_assets.curate.reweight import ReweightConfig, compute_weights, reweight_report, total_variation


def _before(counts: dict[int, int]) -> pl.DataFrame:
    ids, clusters = [], []
    for c, n in counts.items():
        ids += [f"c{c}/{i:04d}" for i in range(n)]
        clusters += [c] * n
    return pl.DataFrame({"image_id": ids, "cluster": clusters}, schema={"image_id": pl.String, "cluster": pl.Int32})


def _kept(counts: dict[int, int]) -> pl.Series:
    return pl.Series("image_id", [f"c{c}/{i:04d}" for c, n in counts.items() for i in range(n)])


def _weight_of(w: pl.DataFrame) -> dict[int, float]:
    per = w.group_by("cluster").agg(pl.col("weight").min().alias("lo"), pl.col("weight").max().alias("hi"))
    assert (per["lo"] == per["hi"]).all(), "one weight per cluster"
    return dict(zip(per["cluster"].to_list(), per["lo"].to_list()))


def test_filter_removing_half_of_a_doubles_its_weight_relative_to_b() -> None:
    before = _before({0: 50, 1: 50})
    kept = _kept({0: 25, 1: 50})
    w = compute_weights(before, kept)

    assert w.columns == ["image_id", "cluster", "weight"]
    assert w.height == 75
    by = _weight_of(w)
    # share before / share after: A = 0.5 / (25/75) = 1.5, B = 0.5 / (50/75) = 0.75; mean over kept = 1.
    assert by[0] == pytest.approx(1.5, abs=1e-12)
    assert by[1] == pytest.approx(0.75, abs=1e-12)
    assert by[0] / by[1] == pytest.approx(2.0, abs=1e-12)
    assert w["weight"].mean() == pytest.approx(1.0, abs=1e-12)

    assert total_variation(before, kept) == pytest.approx(1 / 6, abs=1e-12)
    assert total_variation(before, kept, w) < 1e-9


def test_unclipped_weights_restore_the_distribution_exactly() -> None:
    rng = np.random.default_rng(7)
    counts = {c: int(n) for c, n in enumerate(rng.integers(20, 200, size=30))}
    kept_counts = {c: int(max(1, round(n * rng.uniform(0.3, 1.0)))) for c, n in counts.items()}
    before, kept = _before(counts), _kept(kept_counts)
    w = compute_weights(before, kept, ReweightConfig(min_weight=0.01, max_weight=100.0))

    assert w["weight"].mean() == pytest.approx(1.0, abs=1e-12)
    assert total_variation(before, kept) > 0.01
    assert total_variation(before, kept, w) < 1e-9


def test_clipping_bounds_every_weight_and_keeps_mean_one() -> None:
    # A keeps 1 of 50, B all 50: raw ratios 25.5 and 0.51. With max 10 the one A image sits at the
    # bound and B takes the rest: 10 + 50·x = 51 → x = 0.82.
    before, kept = _before({0: 50, 1: 50}), _kept({0: 1, 1: 50})
    cfg = ReweightConfig(min_weight=0.1, max_weight=10.0)
    w = compute_weights(before, kept, cfg)
    by = _weight_of(w)
    assert by[0] == pytest.approx(10.0, abs=1e-12)
    assert by[1] == pytest.approx(0.82, abs=1e-12)
    assert w["weight"].mean() == pytest.approx(1.0, abs=1e-12)
    assert w["weight"].min() >= cfg.min_weight and w["weight"].max() <= cfg.max_weight

    report = reweight_report(before, kept, w, cfg)
    assert report["clipped_high"] == 1 and report["clipped_low"] == 0
    # A binding clip leaves a residual shift, but less than doing nothing.
    assert 1e-3 < report["tv_weighted"] < report["tv_unweighted"]


def test_lower_bound_binds_too() -> None:
    # A keeps all 100, B 1 of 100: raw ratios 0.505 and 50.5. With [0.95, 10] A sits at 0.95 and
    # the one B image takes the rest: 100·0.95 + x = 101 → x = 6 (inside the band).
    before, kept = _before({0: 100, 1: 100}), _kept({0: 100, 1: 1})
    cfg = ReweightConfig(min_weight=0.95, max_weight=10.0)
    w = compute_weights(before, kept, cfg)
    by = _weight_of(w)
    assert by[0] == pytest.approx(0.95, abs=1e-12)
    assert by[1] == pytest.approx(6.0, abs=1e-9)
    assert w["weight"].mean() == pytest.approx(1.0, abs=1e-12)
    report = reweight_report(before, kept, w, cfg)
    assert report["clipped_low"] == 100 and report["clipped_high"] == 0


def test_emptied_cluster_cannot_be_restored_and_is_reported() -> None:
    before, kept = _before({0: 40, 1: 40, 2: 20}), _kept({0: 20, 1: 40})
    w = compute_weights(before, kept)
    assert set(w["cluster"].to_list()) == {0, 1}
    # Cluster 2 held 20% before and nothing after; the others are restored to their relative shares.
    assert total_variation(before, kept, w) == pytest.approx(0.2, abs=1e-9)
    report = reweight_report(before, kept, w)
    assert report["clusters_emptied"] == 1
    assert report["tv_weighted"] == pytest.approx(0.2, abs=1e-9)


def test_report_lists_largest_shifts_and_plots_them() -> None:
    before, kept = _before({0: 50, 1: 50, 2: 50}), _kept({0: 10, 1: 50, 2: 45})
    w = compute_weights(before, kept)
    report = reweight_report(before, kept, w, top=2)
    shifts = report["top_shifts"]
    assert shifts.columns == ["cluster", "share_before", "share_after", "share_after_weighted", "shift"]
    assert shifts["cluster"].to_list()[0] == 0 and shifts.height == 2
    assert shifts["share_after_weighted"].to_list() == pytest.approx([1 / 3, 1 / 3], abs=1e-9)
    assert report["plot_png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert report["tv_weighted"] < 1e-9 < report["tv_unweighted"]


def test_clustering_column_selects_the_configured_clustering() -> None:
    b0 = _before({0: 50, 1: 50}).with_columns(pl.lit(0).alias("clustering"))
    # In clustering 1 everything is one cluster, so no reweighting is needed there.
    b1 = b0.with_columns(pl.lit(1).alias("clustering"), pl.lit(0, pl.Int32).alias("cluster"))
    both = pl.concat([b0, b1])
    kept = _kept({0: 25, 1: 50})
    assert _weight_of(compute_weights(both, kept, ReweightConfig(clustering=0)))[0] == pytest.approx(1.5)
    assert _weight_of(compute_weights(both, kept, ReweightConfig(clustering=1)))[0] == pytest.approx(1.0)


def test_bad_inputs_fail_with_a_message() -> None:
    with pytest.raises(ValueError, match="min_weight <= 1 <= max_weight"):
        ReweightConfig(min_weight=2.0)
    with pytest.raises(ValueError, match="clustering must be >= 0"):
        ReweightConfig(clustering=-1)
    before = _before({0: 3})
    with pytest.raises(ValueError, match="more than once"):
        compute_weights(pl.concat([before, before]), _kept({0: 1}))
    assert compute_weights(before, pl.Series("image_id", [], dtype=pl.String)).height == 0
