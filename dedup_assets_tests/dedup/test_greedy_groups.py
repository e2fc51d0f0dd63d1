"""Duplicate groups without chaining: the greedy keeper rule, in numpy and in DuckDB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dedup_assets.dedup.groups import greedy_keepers
from dedup_assets.tables import build_duplicate_groups, merge_verified_pairs
from dedup_assets.warehouse import Warehouse


def test_a_chain_is_not_one_group() -> None:
    # A≈B, B≈C, C≈D, A not ≈ C: ranks A < B < C < D
    keeper, sim = greedy_keepers(4, np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([0.95, 0.94, 0.93], np.float32))
    assert keeper.tolist() == [0, 0, 2, 2]  # B removed as a copy of A; C kept; D removed as a copy of C
    assert sim.tolist() == pytest.approx([1.0, 0.95, 1.0, 0.93])


def test_the_best_ranked_kept_neighbour_is_the_keeper() -> None:
    # 3 is a neighbour of both 0 and 1 (0 and 1 not ≈): both are kept, 3 goes with 0
    keeper, _ = greedy_keepers(4, np.array([3, 3, 2]), np.array([1, 0, 1]), np.array([0.9, 0.91, 0.97], np.float32))
    assert keeper.tolist() == [0, 1, 1, 0]


def _warehouse(tmp_path: Path, n: int, pairs: list[tuple[int, int, float]], width: np.ndarray) -> Warehouse:
    wh = Warehouse(tmp_path / "wh.duckdb")
    ids = [f"img{k:04d}" for k in range(n)]
    wh.replace_table("image_index", pl.DataFrame({
        "image_id": ids, "width": width.astype(np.int32), "height": np.full(n, 10, np.int32),
        "bytes": np.zeros(n, np.int64), "location": ids,
    }))
    a = [min(ids[i], ids[j]) for i, j, _ in pairs]
    b = [max(ids[i], ids[j]) for i, j, _ in pairs]
    wh.replace_table("candidate_pairs", pl.DataFrame(
        {"image_a": a, "image_b": b, "similarity": [s for *_, s in pairs], "found_by": [1] * len(pairs)},
        schema={"image_a": pl.String, "image_b": pl.String, "similarity": pl.Float32, "found_by": pl.UInt8},
    ))
    merge_verified_pairs(wh, None, tau=0.0)  # no verification: every candidate pair is an edge
    return wh


@pytest.mark.parametrize("max_rounds", [40, 1, 0])
def test_duckdb_rounds_give_the_greedy_result(tmp_path: Path, max_rounds: int) -> None:
    rng = np.random.default_rng(4)
    n = 400
    pairs = {}
    for _ in range(900):  # a random graph with long chains and dense clumps
        i, j = rng.integers(0, n, 2)
        if i != j:
            pairs[(min(i, j), max(i, j))] = float(rng.uniform(0.9, 1.0))
    for k in range(0, 60):  # one long chain in id order
        pairs[(200 + k, 201 + k)] = 0.95
    plist = [(i, j, s) for (i, j), s in pairs.items()]
    width = rng.integers(1, 50, n)
    wh = _warehouse(tmp_path, n, plist, width)
    stats = build_duplicate_groups(wh, "resolution", max_rounds=max_rounds)
    assert stats["removed_without_pair_to_keeper"] == 0
    got = wh.read_table("duplicate_groups")

    # reference: rank = (area desc, bytes desc, image_id asc) as the policy says, then greedy_keepers
    ids = np.array([f"img{k:04d}" for k in range(n)])
    in_pair = sorted({i for i, _, _ in plist} | {j for _, j, _ in plist})
    order = sorted(in_pair, key=lambda r: (-int(width[r]) * 10, ids[r]))
    rank = {r: t for t, r in enumerate(order)}
    keeper, sim = greedy_keepers(
        len(order), np.array([rank[i] for i, _, _ in plist]), np.array([rank[j] for _, j, _ in plist]),
        np.array([s for *_, s in plist], np.float32),
    )
    removed = {ids[order[t]]: ids[order[keeper[t]]] for t in range(len(order)) if keeper[t] != t}
    got_removed = dict(zip(*got.filter(~pl.col("is_keeper")).select("image_id", "group_id").to_dict(as_series=False).values()))
    assert got_removed == removed
    keepers = set(got.filter(pl.col("is_keeper"))["image_id"].to_list())
    assert keepers == set(removed.values())
    # no chaining: every member is a pair ≥ τ with its keeper, and no two keepers form a pair
    for r in got.filter(~pl.col("is_keeper")).iter_rows(named=True):
        i, j = int(r["image_id"][3:]), int(r["group_id"][3:])
        assert r["similarity_to_keeper"] == pytest.approx(pairs[(min(i, j), max(i, j))], abs=1e-6)
    kept_rows = [int(k[3:]) for k in keepers]
    assert not any((min(a, b), max(a, b)) in pairs for a in kept_rows for b in kept_rows if a < b)
    sizes = got.group_by("group_id").len()
    assert (got.filter(pl.col("is_keeper")).join(sizes, on="group_id")
            .select((pl.col("group_size") == pl.col("len")).all()).item())


def test_no_pairs_gives_an_empty_table(tmp_path: Path) -> None:
    wh = _warehouse(tmp_path, 3, [], np.ones(3))
    assert build_duplicate_groups(wh)["rows"] == 0
    assert wh.read_table("duplicate_groups").height == 0
