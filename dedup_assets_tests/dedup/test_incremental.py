"""Incremental dedup: new vectors assigned to stored centroids, pairs searched only where a new
image takes part — and the same planted duplicates as the full run."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.groups import connected_components
from dedup_assets.dedup.incremental import needs_refit, pairs_with_new
from dedup_assets.dedup.kmeans import ClusteringConfig, assign, fit_clusterings
from dedup_assets.dedup.pairs import pairs_within_clusters, union_pairs
from dedup_assets.dedup.synthetic import make_embeddings


def _pair_set(p) -> set[tuple[int, int]]:
    return set(zip(p.i.tolist(), p.j.tolist()))


def test_pairs_with_new_equals_full_search_restricted_to_new_rows() -> None:
    x, _ = make_embeddings(3000, d=64, seed=1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=x.shape[0])
    labels2 = rng.integers(0, 12, size=x.shape[0])
    is_new = np.zeros(x.shape[0], dtype=bool)
    is_new[rng.choice(x.shape[0], 400, replace=False)] = True
    for l2 in (None, labels2):
        full = pairs_within_clusters(x, labels, l2, threshold=0.9, block_size=256)
        expected = {(a, b) for a, b in _pair_set(full) if is_new[a] or is_new[b]}
        for block in (7, 64, 5000):
            got = pairs_with_new(x, labels, l2, is_new, threshold=0.9, block_size=block, clustering_index=2)
            assert _pair_set(got) == expected
            assert (got.i < got.j).all() and (got.found_by == 4).all()


def test_incremental_run_finds_the_planted_duplicates_the_full_run_finds() -> None:
    x, planted = make_embeddings(6000, d=64, seed=4)
    rng = np.random.default_rng(1)
    order = rng.permutation(x.shape[0])
    x, planted = x[order], planted[order]
    n_old = 4500  # the corpus at fit time; the last 1500 rows arrive in a new shard
    cfg = ClusteringConfig(n_clusterings=5, seed=0)
    tau = 0.9

    full_fit = fit_clusterings(x, cfg)
    full = union_pairs([pairs_within_clusters(x, c.labels, c.labels2, tau, clustering_index=c.index) for c in full_fit])

    old_fit = fit_clusterings(x[:n_old], cfg)
    old = union_pairs(
        [pairs_within_clusters(x[:n_old], c.labels, c.labels2, tau, clustering_index=c.index) for c in old_fit]
    )
    is_new = np.arange(x.shape[0]) >= n_old
    per = []
    for c in old_fit:
        new_labels, new_labels2 = assign(x[n_old:], c.centroids, soft=cfg.soft)
        labels = np.concatenate([c.labels, new_labels])
        labels2 = None if new_labels2 is None else np.concatenate([c.labels2, new_labels2])
        per.append(pairs_with_new(x, labels, labels2, is_new, tau, clustering_index=c.index))
    new = union_pairs(per)
    assert new.comparisons < full.comparisons / 2  # much less work than searching everything again
    inc = union_pairs([old, new])

    def planted_found(p) -> float:
        """Fraction of planted members that share a component with the first member of their group."""
        comp = connected_components(x.shape[0], p.i, p.j)
        rows = np.flatnonzero(planted >= 0)
        first: dict[int, int] = {}
        hits = []
        for r in rows.tolist():
            g = int(planted[r])
            if g in first:
                hits.append(comp[r] == comp[first[g]])
            else:
                first[g] = r
        assert len(hits) > 100
        return float(np.mean(hits))

    full_rate, inc_rate = planted_found(full), planted_found(inc)
    assert full_rate > 0.9
    assert inc_rate >= full_rate - 0.02  # same groups up to k-means randomness


def test_needs_refit() -> None:
    assert not needs_refit(150, 100, 2.0)
    assert needs_refit(201, 100, 2.0)
    assert needs_refit(1, 0, 2.0)
    with pytest.raises(ValueError, match="refit_factor"):
        needs_refit(1, 1, 0.5)
