"""The DuckDB warehouse: partition replacement, odd shard names, vectors, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from dedup_assets.warehouse import Warehouse, WarehouseError


def _frame(shard: str, n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"image_id": [f"{shard}/{i}" for i in range(start, start + n)], "shard": [shard] * n})


def test_replace_partition_replaces_rows_never_duplicates(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.replace_partition("t", _frame("a", 3), "shard", "a")
    wh.replace_partition("t", _frame("b", 2), "shard", "b")
    wh.replace_partition("t", _frame("a", 4, start=10), "shard", "a")  # re-materialize shard a
    rows = wh.query("SELECT image_id FROM t ORDER BY image_id")["image_id"].to_list()
    assert rows == ["a/10", "a/11", "a/12", "a/13", "b/0", "b/1"]


def test_shard_names_that_would_break_string_built_sql(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    evil = "x'; DROP TABLE t; --"
    wh.replace_partition("t", _frame("plain", 1), "shard", "plain")
    wh.replace_partition("t", _frame(evil, 2), "shard", evil)
    wh.replace_partition("t", _frame(evil, 1), "shard", evil)
    counts = dict(wh.query("SELECT shard, count(*) AS n FROM t GROUP BY shard").iter_rows())
    assert counts == {"plain": 1, evil: 1}


def test_rows_of_another_partition_are_refused(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    with pytest.raises(WarehouseError, match="do not belong"):
        wh.replace_partition("t", _frame("a", 2), "shard", "b")


def test_schema_change_fails_with_instructions(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.replace_partition("t", _frame("a", 1), "shard", "a")
    with pytest.raises(WarehouseError, match="DROP TABLE"):
        wh.replace_partition("t", _frame("b", 1).with_columns(pl.lit(1).alias("extra")), "shard", "b")


def test_vectors_round_trip_as_float_array(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 16)).astype(np.float32)
    ids = [f"s/{i:03d}" for i in range(50)][::-1]
    df = pl.DataFrame({"image_id": ids, "shard": ["s"] * 50, "embedding": v},
                      schema={"image_id": pl.String, "shard": pl.String, "embedding": pl.Array(pl.Float32, 16)})
    wh.replace_partition("e", df, "shard", "s")
    with duckdb.connect(str(wh.path), read_only=True) as con:  # a user with plain duckdb sees FLOAT[16]
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name='e'").fetchall())
    assert types["embedding"] == "FLOAT[16]"
    got_ids, m = wh.read_vectors("e", "image_id", "embedding")
    assert got_ids == sorted(ids)
    assert m.dtype == np.float32 and m.flags["C_CONTIGUOUS"] and m.shape == (50, 16)
    np.testing.assert_array_equal(m, v[::-1])


def test_missing_table_message_names_the_asset(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="materialize the asset 'image_index'"):
        Warehouse(tmp_path / "w.duckdb").read_table("image_index")


def _writer(path: str, shard: str, rounds: int) -> None:
    wh = Warehouse(path)
    for r in range(rounds):
        wh.replace_partition("t", _frame(shard, 200, start=r), "shard", shard)


def test_concurrent_writers_in_two_processes_do_not_corrupt(tmp_path: Path) -> None:
    path = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s, 15)) for s in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    counts = dict(Warehouse(path).query("SELECT shard, count(*) AS n FROM t GROUP BY shard").iter_rows())
    assert counts == {"a": 200, "b": 200, "c": 200}


def test_cgroup_limit_is_read_from_the_process_own_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    from dedup_assets.warehouse import _cgroup_limit

    # v1: the process sits in /bench/run; the root is unlimited, the parent caps at 3 GB, the own cgroup at 5 GB
    mem = tmp_path / "v1" / "memory"
    (mem / "bench" / "run").mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(str(1 << 62))
    (mem / "bench" / "memory.limit_in_bytes").write_text(str(3 << 30))
    (mem / "bench" / "run" / "memory.limit_in_bytes").write_text(str(5 << 30))
    proc = tmp_path / "cgroup_v1"
    proc.write_text("12:cpu,cpuacct:/bench/run\n4:memory:/bench/run\n")
    assert _cgroup_limit(str(proc), str(tmp_path / "v1")) == 3 << 30
    # v2: one unified line; "max" means no limit at that level
    v2 = tmp_path / "v2"
    (v2 / "a" / "b").mkdir(parents=True)
    (v2 / "a" / "memory.max").write_text("max\n")
    (v2 / "a" / "b" / "memory.max").write_text(str(2 << 30))
    proc2 = tmp_path / "cgroup_v2"
    proc2.write_text("0::/a/b\n")
    assert _cgroup_limit(str(proc2), str(v2)) == 2 << 30
    assert _cgroup_limit(str(tmp_path / "missing"), str(tmp_path / "none")) is None
