"""Synthetic embeddings have the promised structure, and the whole candidate search finds the
planted duplicates: 5 clusterings → pairs → union → groups → recall."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dedup_assets.dedup.groups import build_groups
from dedup_assets.dedup.kmeans import ClusteringConfig, fit_clusterings
from dedup_assets.dedup.pairs import brute_force_pairs, pairs_within_clusters, union_pairs
from dedup_assets.dedup.recall import estimate_recall
from dedup_assets.dedup.synthetic import TopicCoreEmbeddings, make_embeddings, perturb_to_cosine

TAU = 0.9


def test_make_embeddings_shape_norms_and_planted_groups() -> None:
    x, planted = make_embeddings(5000, d=64, seed=1, dup_fraction=0.1, chain_fraction=0.02)
    assert x.shape == (5000, 64) and x.dtype == np.float32
    assert planted.shape == (5000,) and planted.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    x2, planted2 = make_embeddings(5000, d=64, seed=1, dup_fraction=0.1, chain_fraction=0.02)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(planted, planted2)
    n_planted = int((planted >= 0).sum())
    assert 0.12 * 5000 <= n_planted <= 0.2 * 5000
    # Planted rows are scattered, not a block at the end.
    rows = np.flatnonzero(planted >= 0)
    assert rows.min() < 500 and rows.max() > 4500
    # Unrelated rows are far below the duplicate threshold; every planted pair is ≥ τ somewhere.
    s = x[:500] @ x[:500].T
    off = s[np.triu_indices(500, 1)]
    same = (planted[:500, None] == planted[None, :500]) & (planted[:500, None] >= 0)
    unrelated = off[~same[np.triu_indices(500, 1)]]
    assert 0.1 < float(np.median(unrelated)) < 0.6 and unrelated.max() < TAU
    exact = brute_force_pairs(x, TAU, device="cpu")
    assert np.all(planted[exact.i] == planted[exact.j]) and np.all(planted[exact.i] >= 0)
    assert np.unique(planted[exact.i]).size == planted.max() + 1  # every planted group has pairs
    assert make_embeddings(0, d=8)[0].shape == (0, 8)


def test_perturb_to_cosine_is_exact() -> None:
    rng = np.random.default_rng(0)
    seeds = rng.standard_normal((50, 32)).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    cos = rng.uniform(0.9, 0.99, 50)
    basis = np.linalg.qr(rng.standard_normal((32, 4)))[0].astype(np.float32)
    out = perturb_to_cosine(seeds, cos, rng, basis, 0.7)
    np.testing.assert_allclose(np.sum(out * seeds, axis=1), cos, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_topic_core_model_puts_most_pairs_between_different_images_of_dense_cores() -> None:
    gen = TopicCoreEmbeddings(9000, d=96, seed=2, tau=TAU, rows_per_topic=1500, core_degree=5.0)
    x, planted, topic, core = gen.all()
    assert x.shape == (9000, 96) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    again = TopicCoreEmbeddings(9000, d=96, seed=2, tau=TAU, rows_per_topic=1500, core_degree=5.0).all()
    np.testing.assert_array_equal(again[0], x)
    assert len(list(gen.chunks())) == 1 and TopicCoreEmbeddings(0, d=96).all()[0].shape == (0, 96)

    exact = brute_force_pairs(x, TAU, device="cpu")
    i, j = exact.i, exact.j
    is_planted = (planted[i] >= 0) & (planted[i] == planted[j])
    core_pair = core[i] & core[j] & (topic[i] == topic[j])
    assert core_pair.mean() > 0.6, "most pairs join two different (unplanted) images of one core"
    assert is_planted.mean() > 0.03 and np.all(topic[i] == topic[j]), "no pair joins two topics"
    # The core spread is calibrated per topic: core rows of the biggest and of a smaller topic
    # have about the asked-for number of core neighbours.
    degree = np.bincount(np.concatenate([i[core_pair], j[core_pair]]), minlength=x.shape[0])
    for t in (0, 3):
        assert 3.0 < degree[core & (topic == t)].mean() < 8.0, t
    # Planted copies sit at their drawn cosine from the seed.
    seeds = {int(planted[r]): r for r in np.flatnonzero(gen.is_seed)}
    copies = np.flatnonzero((planted >= 0) & ~gen.is_seed)
    cos = np.sum(x[copies] * x[[seeds[int(g)] for g in planted[copies]]], axis=1)
    assert cos.min() >= 0.92 - 1e-5 and cos.max() <= 0.99 + 1e-5


@pytest.mark.parametrize("soft", [False, True])
def test_clustered_search_finds_the_planted_duplicates(soft: bool) -> None:
    x, planted = make_embeddings(6000, d=64, seed=3)
    exact = brute_force_pairs(x, TAU, device="cpu")
    fitted = fit_clusterings(x, ClusteringConfig(n_clusterings=5, soft=soft, niter=10, device="cpu"))
    per = [
        pairs_within_clusters(x, c.labels, c.labels2, threshold=TAU, device="cpu", clustering_index=c.index)
        for c in fitted
    ]
    cand = union_pairs(per)
    exact_keys = set(zip(exact.i.tolist(), exact.j.tolist()))
    cand_keys = set(zip(cand.i.tolist(), cand.j.tolist()))
    assert cand_keys <= exact_keys, "the clustered search is exact inside its scope"
    recall = len(cand_keys) / len(exact_keys)
    first = len(per[0]) / len(exact_keys)
    # One clustering misses pairs cut by a boundary; five (or soft assignment) recover them.
    assert first < recall
    assert recall >= (0.99 if soft else 0.97)
    assert cand.comparisons < 0.5 * 6000 * 6000  # far fewer dot products than brute force (n²)
    est = estimate_recall(x, cand, TAU, n_clusterings=5, sample_size=6000)
    assert est.recall == pytest.approx(recall, abs=1e-9)
    assert est.by_n_clusterings == sorted(est.by_n_clusterings)
    assert est.by_n_clusterings[0] == pytest.approx(first, abs=1e-9)
    # Almost every planted group ends up as one duplicate group.
    ids = [f"img{k:05d}" for k in range(len(x))]
    groups = build_groups(x, cand, ids)
    got = groups.group_by("group_id").agg(pl.col("image_id")).get_column("image_id").to_list()
    got_sets = {frozenset(g) for g in got}
    want = {}
    for k in np.flatnonzero(planted >= 0):
        want.setdefault(int(planted[k]), set()).add(ids[k])
    recovered = sum(frozenset(s) in got_sets for s in want.values()) / len(want)
    assert recovered >= 0.95
