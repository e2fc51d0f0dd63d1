"""Recall estimate: 1.0 on the exact pairs, drops when pairs go missing, never above 1."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.pairs import Pairs, brute_force_pairs, union_pairs
from dedup_assets.dedup.recall import estimate_recall, true_pairs_of, wilson_interval
from dedup_assets.dedup.synthetic import make_embeddings

TAU = 0.9


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, Pairs]:
    x, _ = make_embeddings(3000, d=48, seed=5, dup_fraction=0.15)
    return x, brute_force_pairs(x, TAU, device="cpu")


def _subset(p: Pairs, keep: np.ndarray, bit: int) -> Pairs:
    return Pairs(
        i=p.i[keep], j=p.j[keep], sim=p.sim[keep], found_by=np.full(int(keep.sum()), 1 << bit, np.uint8), comparisons=0
    )


def test_recall_is_one_on_the_exact_pairs(data) -> None:
    x, exact = data
    est = estimate_recall(x, exact, TAU, n_clusterings=5, sample_size=3000)
    assert est.recall == 1.0 and est.n_found == est.n_true_pairs
    # Sampling every image finds every true pair exactly once.
    assert est.n_true_pairs == len(exact) and est.n_sampled == 3000
    assert est.by_n_clusterings == [1.0] * 5  # found_by == 0 (brute force) counts for every prefix
    assert est.ci_low < 1.0 <= est.ci_high + 1e-12
    small = estimate_recall(x, exact, TAU, n_clusterings=1, sample_size=500, seed=3)
    assert small.recall == 1.0 and 0 < small.n_true_pairs < len(exact)


def test_recall_drops_when_pairs_are_removed_and_tracks_each_clustering(data) -> None:
    x, exact = data
    rng = np.random.default_rng(0)
    a = rng.random(len(exact)) < 0.6
    b = rng.random(len(exact)) < 0.6
    cand = union_pairs([_subset(exact, a, 0), _subset(exact, b, 1)])
    est = estimate_recall(x, cand, TAU, n_clusterings=2, sample_size=3000)
    assert est.recall == pytest.approx(np.mean(a | b), abs=1e-9)
    assert est.by_n_clusterings[0] == pytest.approx(np.mean(a), abs=1e-9)
    assert est.by_n_clusterings[1] == pytest.approx(est.recall)
    assert est.ci_low < est.recall < est.ci_high
    sampled = estimate_recall(x, cand, TAU, n_clusterings=2, sample_size=800, seed=1)
    assert sampled.ci_low <= np.mean(a | b) <= sampled.ci_high
    assert estimate_recall(x, Pairs.empty(), TAU, 2, sample_size=3000).recall == 0.0


def test_recall_never_exceeds_one(data) -> None:
    x, exact = data
    # Candidates with extra pairs below the threshold, repeats and reversed order.
    extra = brute_force_pairs(x, 0.8, device="cpu")
    messy = Pairs(
        i=np.concatenate([extra.j, exact.i]),
        j=np.concatenate([extra.i, exact.j]),
        sim=np.concatenate([extra.sim, exact.sim]),
        found_by=np.ones(len(extra) + len(exact), np.uint8),
        comparisons=0,
    )
    est = estimate_recall(x, messy, TAU, n_clusterings=3, sample_size=1000)
    assert est.recall == 1.0 and est.n_found == est.n_true_pairs
    assert all(0.0 <= r <= 1.0 for r in est.by_n_clusterings)
    assert est.ci_high <= 1.0


def test_no_true_pairs_means_recall_one_and_tiny_inputs() -> None:
    x = np.eye(5, 8, dtype=np.float32)  # orthogonal: no pair above any positive threshold
    est = estimate_recall(x, Pairs.empty(), TAU, n_clusterings=2)
    assert (est.recall, est.n_true_pairs, est.ci_low, est.ci_high) == (1.0, 0, 0.0, 1.0)
    assert est.by_n_clusterings == [1.0, 1.0]
    empty = estimate_recall(np.zeros((0, 8), np.float32), Pairs.empty(), TAU, n_clusterings=1)
    assert empty.recall == 1.0 and empty.n_sampled == 0
    one = estimate_recall(x[:1], Pairs.empty(), TAU, n_clusterings=1)
    assert one.recall == 1.0 and one.n_sampled == 1


def test_true_pairs_and_wilson() -> None:
    x, _ = make_embeddings(400, d=16, seed=9, dup_fraction=0.2)
    i, j, s = true_pairs_of(x, np.arange(400), TAU)
    full = x @ x.T
    ref_i, ref_j = np.nonzero(np.triu(full >= np.float32(TAU), 1))
    assert set(zip(i.tolist(), j.tolist())) == set(zip(ref_i.tolist(), ref_j.tolist()))
    assert np.all(s >= np.float32(TAU))
    lo, hi = wilson_interval(95, 100)
    assert lo == pytest.approx(0.8883, abs=1e-3) and hi == pytest.approx(0.9784, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_streamed_recall_counts_the_pairs_of_the_sample_exactly() -> None:
    from dedup_assets.dedup.pairs import brute_force_pairs
    from dedup_assets.dedup.recall import sampled_true_pairs, streamed_recall
    from dedup_assets.dedup.synthetic import make_embeddings

    x, _ = make_embeddings(n=3000, d=32, seed=2)
    ids = [f"i{k:05d}" for k in range(x.shape[0])]
    tau = 0.9
    bf = brute_force_pairs(x, tau, block_size=256)
    assert len(bf) > 100
    # candidates: every true pair but the ones of rows divisible by 3 with a partner > 1500
    keep = ~((bf.i % 3 == 0) & (bf.j > 1500))
    found = {(ids[i], ids[j]): 1 for i, j in zip(bf.i[keep].tolist(), bf.j[keep].tolist())}
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(x.shape[0], 400, replace=False))
    qids = [ids[k] for k in q]
    batches = ((ids[s:s + 700], x[s:s + 700]) for s in range(0, x.shape[0], 700))  # streamed in 5 batches
    pq, pid, ps = sampled_true_pairs(batches, qids, x[q], tau)
    est = streamed_recall(qids, pq, pid, ps, found, tau, n_clusterings=1)
    # exact answer over the pairs that touch the sample (each once)
    qs = set(q.tolist())
    touch = np.array([(i in qs) or (j in qs) for i, j in zip(bf.i.tolist(), bf.j.tolist())])
    assert est.n_true_pairs == int(touch.sum())
    assert est.n_found == int((touch & keep).sum())
    assert est.ci_low <= est.recall <= est.ci_high
    assert est.ci_low < est.ci_high < 1.0  # misses exist, and the interval says so
    assert 0 <= est.dense_recall <= 1 and est.dense_true_pairs > 0
