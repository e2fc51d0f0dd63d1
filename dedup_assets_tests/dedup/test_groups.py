"""Union-find components, keeper policies, anti-chaining and the partition property of groups."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dedup_assets.dedup.groups import GROUP_SCHEMA, KeeperPolicy, build_groups, connected_components
from dedup_assets.dedup.pairs import Pairs, brute_force_pairs


def _pairs(edges: list[tuple[int, int]], x: np.ndarray) -> Pairs:
    i = np.array([min(a, b) for a, b in edges], dtype=np.int64)
    j = np.array([max(a, b) for a, b in edges], dtype=np.int64)
    sim = np.einsum("ij,ij->i", x[i], x[j]).astype(np.float32) if edges else np.zeros(0, np.float32)
    return Pairs(i=i, j=j, sim=sim, found_by=np.ones(i.size, np.uint8), comparisons=0)


def _arc(angles_deg: list[float], d: int = 4) -> np.ndarray:
    """Unit vectors in one plane at the given angles (cosine = cos of the angle difference)."""
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    x = np.zeros((a.size, d), dtype=np.float32)
    x[:, 0], x[:, 1] = np.cos(a), np.sin(a)
    return x


def test_connected_components_known_answer() -> None:
    comp = connected_components(7, np.array([1, 2, 5]), np.array([0, 1, 4]))
    assert comp.tolist() == [0, 0, 0, 3, 4, 4, 6]
    assert comp.dtype == np.int64
    assert connected_components(0, np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0
    # A long chain given in the worst order for naive hooking.
    n = 5000
    comp = connected_components(n, np.arange(n - 1)[::-1].copy(), np.arange(1, n)[::-1].copy())
    assert np.all(comp == 0)
    with pytest.raises(ValueError, match="endpoints"):
        connected_components(3, np.array([0]), np.array([3]))


def test_connected_components_matches_reference_on_random_graph() -> None:
    rng = np.random.default_rng(0)
    n, e = 2000, 1500
    i, j = rng.integers(0, n, e), rng.integers(0, n, e)
    comp = connected_components(n, i, j)
    # Reference: breadth-first search.
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(i.tolist(), j.tolist()):
        adj[a].append(b)
        adj[b].append(a)
    ref = [-1] * n
    for s in range(n):
        if ref[s] < 0:
            ref[s], stack = s, [s]
            while stack:
                u = stack.pop()
                for v in adj[u]:
                    if ref[v] < 0:
                        ref[v] = s
                        stack.append(v)
    assert comp.tolist() == ref


def test_groups_partition_the_grouped_ids() -> None:
    from dedup_assets.dedup.synthetic import make_embeddings

    x, planted = make_embeddings(3000, d=48, seed=2, dup_fraction=0.15, chain_fraction=0.03)
    pairs = brute_force_pairs(x, 0.9, device="cpu")
    ids = [f"s0/{k:05d}" for k in range(len(x))]
    df = build_groups(x, pairs, ids)
    assert df.schema == pl.Schema(GROUP_SCHEMA)
    assert df["image_id"].n_unique() == df.height, "every id at most once"
    per_group = df.group_by("group_id").agg(
        pl.len().alias("n"), pl.col("is_keeper").sum().alias("keepers"), pl.col("group_size").first()
    )
    assert per_group["n"].min() >= 2
    assert per_group["keepers"].to_list() == [1] * per_group.height
    assert (per_group["n"] == per_group["group_size"]).all()
    keepers = df.filter(pl.col("is_keeper"))
    assert (keepers["group_id"] == keepers["image_id"]).all()
    assert (keepers["similarity_to_keeper"] == 1.0).all()
    assert df.sort("group_id", "image_id").equals(df)
    # Every image on a pair is grouped; with exact pairs the groups are the planted groups.
    on_pair = set(pairs.i.tolist()) | set(pairs.j.tolist())
    assert set(df["image_id"].to_list()) == {ids[k] for k in on_pair}
    row = {s: k for k, s in enumerate(ids)}
    by_group = df.group_by("group_id").agg(pl.col("image_id"))
    planted_sets = {}
    for k in np.flatnonzero(planted >= 0):
        planted_sets.setdefault(int(planted[k]), set()).add(ids[k])
    found_sets = {frozenset(m) for m in by_group["image_id"].to_list()}
    assert found_sets == {frozenset(s) for s in planted_sets.values()}
    # Tightness columns agree with the vectors.
    members = df.filter(pl.col("group_size") > 2)
    g = members["group_id"][0]
    m = [row[s] for s in members.filter(pl.col("group_id") == g)["image_id"].to_list()]
    s = x[m] @ x[m].T
    got = members.filter(pl.col("group_id") == g)
    assert got["group_diameter"][0] == pytest.approx(1 - s.min(), abs=1e-5)
    assert got["group_min_similarity"][0] == pytest.approx(float(s[m.index(row[g])].min()), abs=1e-5)


def test_resolution_policy_area_then_bytes_then_id() -> None:
    x = _arc([0, 5, 10, 40, 45, 80, 84])
    pairs = _pairs([(0, 1), (1, 2), (3, 4), (5, 6)], x)
    ids = ["a", "b", "c", "d", "e", "g", "f"]
    width = [100, 300, 200, 100, 100, 50, 50]
    height = [100, 100, 100, 100, 100, 50, 50]
    file_bytes = [1, 1, 1, 10, 20, 5, 5]
    df = build_groups(x, pairs, ids, KeeperPolicy("resolution"), width=width, height=height, file_bytes=file_bytes)
    keepers = df.filter(pl.col("is_keeper"))["image_id"].sort().to_list()
    # b: largest area; e: same area as d, more bytes; f: full tie with g, smaller id.
    assert keepers == ["b", "e", "f"]
    assert df.filter(pl.col("image_id") == "g")["group_id"][0] == "f"
    sim_a = df.filter(pl.col("image_id") == "a")["similarity_to_keeper"][0]
    assert sim_a == pytest.approx(np.cos(np.radians(5)), abs=1e-6)


def test_centroid_policy_picks_the_member_nearest_the_mean() -> None:
    x = _arc([0, 3, 6, 9, 12][::-1] + [30])  # row 2 (6°) is the middle of the first five
    pairs = _pairs([(0, 1), (1, 2), (2, 3), (3, 4)], x)
    ids = ["r0", "r1", "r2", "r3", "r4", "r5"]
    df = build_groups(x, pairs, ids, KeeperPolicy("centroid"))
    assert df.filter(pl.col("is_keeper"))["image_id"].to_list() == ["r2"]
    assert df.height == 5 and "r5" not in df["image_id"].to_list()


def test_priority_policy_highest_value_then_smallest_id() -> None:
    x = _arc([0, 4, 8, 40, 44, 48])
    pairs = _pairs([(0, 1), (1, 2), (3, 4), (4, 5)], x)
    ids = ["x", "y", "z", "m", "k", "l"]
    priority = [1.0, 7.0, 3.0, 2.0, 2.0, float("nan")]
    df = build_groups(x, pairs, ids, KeeperPolicy("priority"), priority=priority)
    assert sorted(df.filter(pl.col("is_keeper"))["image_id"].to_list()) == ["k", "y"]
    with pytest.raises(ValueError, match="priority"):
        build_groups(x, pairs, ids, KeeperPolicy("priority"))
    with pytest.raises(ValueError, match="keeper policy"):
        KeeperPolicy("largest")  # type: ignore[arg-type]


def test_split_below_breaks_a_chain() -> None:
    step = float(np.degrees(np.arccos(0.97)))  # neighbours at cosine 0.97, two steps at ~0.88
    x = _arc([k * step for k in range(6)])
    pairs = _pairs([(k, k + 1) for k in range(5)], x)
    ids = [f"c{k}" for k in range(6)]
    chained = build_groups(x, pairs, ids)
    assert chained["group_id"].unique().to_list() == ["c0"] and chained.height == 6
    assert chained["group_min_similarity"][0] < 0.9
    split = build_groups(x, pairs, ids, split_below=0.9)
    groups = split.group_by("group_id").agg(pl.col("image_id").sort()).sort("group_id")
    assert groups["image_id"].to_list() == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]
    assert (split["similarity_to_keeper"] >= 0.9).all()
    assert (split["group_min_similarity"] >= 0.9).all()


def test_no_pairs_and_tiny_inputs() -> None:
    for n in (0, 1, 2):
        x = _arc([0.0] * n)
        df = build_groups(x, _pairs([], x), [f"i{k}" for k in range(n)])
        assert df.height == 0 and df.schema == pl.Schema(GROUP_SCHEMA)
    x = _arc([0.0, 1.0])
    df = build_groups(x, _pairs([(0, 1)], x), ["b", "a"])
    assert df["image_id"].to_list() == ["a", "b"] and df["group_id"].to_list() == ["a", "a"]
    with pytest.raises(ValueError, match="one row per id"):
        build_groups(x, _pairs([(0, 1)], x), ["a"])
