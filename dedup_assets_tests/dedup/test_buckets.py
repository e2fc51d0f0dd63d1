"""The bucketed pair search: routing vectors to buckets of clusters and searching bucket by bucket
finds exactly the pairs of the unbucketed within-cluster search (and, with one cluster, brute force)."""

from __future__ import annotations

import numpy as np
import pytest

from dedup_assets.dedup.buckets import BALANCE, choose_n_buckets, plan_buckets, route, search_bucket
from dedup_assets.dedup.kmeans import assign_many, fit_centroids
from dedup_assets.dedup.pairs import brute_force_pairs, pairs_within_clusters, union_pairs
from dedup_assets.dedup.synthetic import make_embeddings


def _bucketed(x: np.ndarray, centroids, buckets, soft: bool, tau: float, is_new=None, band=None) -> set[tuple[int, int, int]]:
    """Route every row, search each bucket over its own compact matrix, union over buckets."""
    labels = assign_many(x, centroids, soft=soft, device="cpu")
    routed = route(labels, buckets)
    out: dict[tuple[int, int], int] = {}
    for b, r in routed.items():
        xb = x[r.rows]  # the bucket's distinct vectors, as its files would hold them
        bp = search_bucket(lambda idx: xb[idx], r.vec, r.clustering, r.cluster, r.cluster2, tau,
                           block_size=64, is_new=None if is_new is None else is_new[r.rows], band=band)
        for i, j, f in zip(r.rows[bp.vi].tolist(), r.rows[bp.vj].tolist(), bp.found_by.tolist()):
            key = (min(i, j), max(i, j))
            out[key] = out.get(key, 0) | f
    return {(i, j, f) for (i, j), f in out.items()}


def _fit(x: np.ndarray, k: int, n_clusterings: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cents, loads = [], []
    for c in range(n_clusterings):
        rng = np.random.default_rng(100 + c)
        sample = x[np.sort(rng.choice(x.shape[0], size=x.shape[0] // 2, replace=False))]
        cc, load = fit_centroids(sample, k, niter=10, seed=c)
        cents.append(cc)
        loads.append(load)
    return cents, loads


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("n_buckets", [1, 3, 7])
def test_bucketed_search_equals_the_unbucketed_within_cluster_search(soft: bool, n_buckets: int) -> None:
    x, _ = make_embeddings(n=1500, d=32, seed=3)
    tau = 0.9
    cents, loads = _fit(x, k=24, n_clusterings=3)
    buckets = plan_buckets(cents, loads, n_buckets, seed=0)
    assert all(b.shape == (24,) and b.min() >= 0 and b.max() < n_buckets for b in buckets)
    got = _bucketed(x, cents, buckets, soft, tau)

    labels = assign_many(x, cents, soft=soft, device="cpu")
    per = [pairs_within_clusters(x, l1, l2, threshold=tau, block_size=64, clustering_index=c)
           for c, (l1, l2) in enumerate(labels)]
    want = union_pairs(per)
    assert got == set(zip(want.i.tolist(), want.j.tolist(), want.found_by.tolist()))
    assert len(got) >= 50  # the planted copies are found


def test_one_cluster_is_brute_force() -> None:
    x, _ = make_embeddings(n=600, d=16, seed=5)
    cents, loads = _fit(x, k=1, n_clusterings=1)
    got = {(i, j) for i, j, _ in _bucketed(x, cents, plan_buckets(cents, loads, 4), False, 0.8)}
    bf = brute_force_pairs(x, 0.8, block_size=64)
    assert len(bf)
    assert got == set(zip(bf.i.tolist(), bf.j.tolist()))


def test_band_keeps_every_pair_above_hi_and_each_images_top_k_below_it() -> None:
    x, _ = make_embeddings(n=600, d=16, seed=5)
    cents, loads = _fit(x, k=1, n_clusterings=1)  # one cluster: the band rule is exact per image
    hi, lo, k = 0.9, 0.6, 3
    got = {(i, j) for i, j, _ in _bucketed(x, cents, plan_buckets(cents, loads, 1), False, lo, band=(hi, k))}
    bf = brute_force_pairs(x, lo, block_size=64)
    above = {(i, j) for i, j, s in zip(bf.i.tolist(), bf.j.tolist(), bf.sim.tolist()) if s >= hi}
    assert above <= got
    band: dict[int, list[tuple[float, int, tuple[int, int]]]] = {}
    for i, j, s in zip(bf.i.tolist(), bf.j.tolist(), bf.sim.tolist()):
        if s < hi:
            band.setdefault(i, []).append((-s, j, (i, j)))
            band.setdefault(j, []).append((-s, i, (i, j)))
    want = above | {p for v in band.values() for _, _, p in sorted(v)[:k]}
    assert got == want
    assert len(got - above) <= 2 * k * x.shape[0] < len(bf.i) - len(above)  # the band is bounded, and it bit


def test_band_keep_ranks_by_similarity_then_index() -> None:
    from dedup_assets.dedup.pairs import band_keep

    i = np.array([0, 0, 0, 1, 2, 3])
    j = np.array([1, 2, 3, 2, 3, 4])
    s = np.array([0.95, 0.8, 0.7, 0.6, 0.85, 0.5], np.float32)
    assert band_keep(i, j, s, 0.9, 1).tolist() == [True, True, False, True, True, True]
    assert band_keep(i, j, s, 0.9, 0).tolist() == [True, False, False, False, False, False]
    tie = band_keep(np.array([0, 0]), np.array([2, 1]), np.array([0.5, 0.5], np.float32), 0.9, 1)
    assert tie.tolist() == [True, True]  # 0 keeps its lower-index partner 1; 2 keeps its only pair


def test_incremental_search_returns_exactly_the_pairs_that_touch_new_vectors() -> None:
    x, _ = make_embeddings(n=1200, d=32, seed=9)
    tau = 0.9
    cents, loads = _fit(x, k=16, n_clusterings=2)
    buckets = plan_buckets(cents, loads, 3)
    is_new = np.zeros(x.shape[0], bool)
    is_new[np.random.default_rng(0).choice(x.shape[0], 300, replace=False)] = True
    full = _bucketed(x, cents, buckets, True, tau)
    inc = _bucketed(x, cents, buckets, True, tau, is_new=is_new)
    assert inc == {(i, j, f) for i, j, f in full if is_new[i] or is_new[j]}
    assert inc  # new vectors have partners


def test_plan_keeps_a_vectors_clusters_together_and_balances_loads() -> None:
    x, _ = make_embeddings(n=4000, d=32, seed=1)
    cents, loads = _fit(x, k=64, n_clusterings=5)
    buckets = plan_buckets(cents, loads, 4, seed=0)
    for b, load in zip(buckets, loads):
        per = np.bincount(b, weights=load, minlength=4)
        assert per.max() <= BALANCE * load.sum() / 4 + load.max()
    labels = assign_many(x, cents, soft=True, device="cpu")
    routed = route(labels, buckets)
    copies = sum(r.rows.size for r in routed.values()) / x.shape[0]
    # 5 clusterings × 2 clusters could put a vector in all 4 buckets; the shared super-clusters keep
    # most of its clusters in one bucket
    assert copies < 2.5, copies


def test_choose_n_buckets() -> None:
    assert choose_n_buckets(100, 8) == 2
    assert choose_n_buckets(1_000_000, 1024) == 5
    assert choose_n_buckets(1_000_000, 3) == 3
    assert choose_n_buckets(10, 1) == 1
    with pytest.raises(ValueError):
        choose_n_buckets(10, 4, rows_per_bucket=0)


def test_spilled_pairs_equal_the_in_memory_union(tmp_path) -> None:
    """The step's path: chunks spilled to many small Parquet parts and unioned in DuckDB give the
    in-memory union (max similarity, found_by ORed), with image ids ordered and shards carried;
    incremental mode keeps exactly the old rows that touch no dirty shard."""
    import polars as pl

    from dedup_assets.dedup.buckets import BucketStats, bucket_pair_chunks, union_chunks
    from dedup_assets.tables import BUCKET_PAIRS_SCHEMA, CorpusFiles
    from dedup_assets.warehouse import Warehouse

    x, _ = make_embeddings(n=1500, d=32, seed=3)
    tau = 0.9
    cents, loads = _fit(x, k=24, n_clusterings=3)
    labels = assign_many(x, cents, soft=True, device="cpu")
    r = route(labels, plan_buckets(cents, loads, 1))[0]
    xb = x[r.rows]
    stats = BucketStats()
    chunks = list(bucket_pair_chunks(lambda idx: xb[idx], r.vec, r.clustering, r.cluster, r.cluster2, tau, stats,
                                     block_size=64))
    vi, vj, sim, fb = union_chunks(chunks)
    raw = sum(len(c[0]) for c in chunks)
    assert raw > vi.size > 50  # soft clusters and three clusterings find pairs more than once
    # ids whose string order is the reverse of the vector order, so the step must swap
    n = xb.shape[0]
    ids = [f"s{i % 2}/{n - i:06d}" for i in range(n)]
    part_of = (np.arange(n) % 2).astype(np.int32)
    files = CorpusFiles(Warehouse(tmp_path / "wh.duckdb"))
    fit_id = "abcdef12"
    spill = files.pair_spill(fit_id, 0, rows_per_part=37)
    for c in chunks:
        spill.add(*c)
    assert len(spill.parts) >= 3  # several parts on disk before the merge
    n_new, total = spill.finish(ids, ["s0", "s1"], part_of, {"fit_id": fit_id})
    assert n_new == total == vi.size
    assert not spill.dir.exists()  # parts removed
    got = pl.read_parquet(files.pairs_path(fit_id, 0))
    assert dict(got.schema) == BUCKET_PAIRS_SCHEMA
    assert (got["image_a"] < got["image_b"]).all()
    assert got["h"].is_sorted() and got["h"].n_unique() > 1  # sorted by hash class, so merge passes skip row groups
    want = {(min(ids[a], ids[b]), max(ids[a], ids[b])): (s, f) for a, b, s, f in
            zip(vi.tolist(), vj.tolist(), sim.tolist(), fb.tolist())}
    have = {(a, b): (s, f) for a, b, s, f in got.select("image_a", "image_b", "similarity", "found_by").iter_rows()}
    assert have.keys() == want.keys()
    assert all(have[k][1] == want[k][1] and abs(have[k][0] - want[k][0]) < 1e-6 for k in want)
    assert all(row[4] == row[0].split("/")[0] and row[5] == row[1].split("/")[0] for row in got.iter_rows())

    # incremental: shard s1 is dirty; its new pairs come from the chunks of pairs touching it
    touches = [tuple(a[(part_of[c[0]] == 1) | (part_of[c[1]] == 1)] for a in c) for c in chunks]
    spill = files.pair_spill(fit_id, 0, rows_per_part=1000)
    for c in touches:
        spill.add(*c)
    n_new, total = spill.finish(ids, ["s0", "s1"], part_of, {"fit_id": fit_id}, old_dirty=["s1"])
    again = pl.read_parquet(files.pairs_path(fit_id, 0))
    assert total == again.height == got.height  # same pairs: old s0–s0 rows kept, the rest recomputed
    assert n_new == got.filter((pl.col("shard_a") == "s1") | (pl.col("shard_b") == "s1")).height
    assert set(again.select("image_a", "image_b").iter_rows()) == set(want)


def test_bucket_count_is_raised_until_the_largest_expected_bucket_fits() -> None:
    from dedup_assets.dedup.buckets import fit_bucket_count
    from dedup_assets.dedup.kmeans import probe_many

    x, _ = make_embeddings(n=6000, d=32, seed=2)
    cents, loads = _fit(x, k=64, n_clusterings=5)
    sample = x[np.random.default_rng(0).choice(x.shape[0], 2000, replace=False)]
    labels = probe_many(sample, cents, 2, 0.02, device="cpu", second_margin=0.1)
    rows_per_bucket = 1000
    start = choose_n_buckets(x.shape[0], 64, rows_per_bucket)  # 6: ignores the copies per vector
    logged: list[str] = []
    nb, plan = fit_bucket_count(cents, loads, labels, x.shape[0], start, rows_per_bucket, log=logged.append)
    assert nb > start and logged
    routed = route(probe_many(x, cents, 2, 0.02, device="cpu", second_margin=0.1), plan)
    sizes = sorted(r.rows.size for r in routed.values())
    assert sizes[-1] <= 1.6 * rows_per_bucket, sizes  # all vectors, not the sample: within the slack and noise
    # with a large enough rule nothing changes
    assert fit_bucket_count(cents, loads, labels, x.shape[0], 2, 10**6)[0] == 2
