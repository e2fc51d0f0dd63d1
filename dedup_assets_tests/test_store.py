"""The embedding store: round trip, atomic replacement, bounded batches, row reads, sampling, keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dedup_assets.store import ROW_GROUP_ROWS, EmbeddingStore, StoreError, escape_key, unescape_name


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fill(store: EmbeddingStore, sizes: dict[str, int], d: int = 16) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for i, (key, n) in enumerate(sizes.items()):
        ids = [f"{key}/{j:06d}" for j in range(n)]
        vecs = _unit(n, d, seed=i)
        assert store.write_partition(key, ids, vecs, "m1") == n
        out[key] = (ids, vecs)
    return out


def test_round_trip_and_footer_answers(tmp_path: Path) -> None:
    store = EmbeddingStore.for_warehouse(tmp_path / "wh.duckdb")
    assert store.root == tmp_path / "wh_files" / "embeddings"
    assert store.partitions() == [] and store.count() == 0 and store.dim() is None and store.models() == set()
    data = _fill(store, {"b": 10, "a": 7, "c": 0})
    assert store.partitions() == ["a", "b", "c"]
    assert store.count() == 17 and store.count(["a"]) == 7 and store.counts() == {"a": 7, "b": 10, "c": 0}
    assert store.dim() == 16 and store.models() == {"m1"}
    for key, (ids, vecs) in data.items():
        got_ids, got = store.read_partition(key)
        assert got_ids == ids
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (len(ids), 16)
        np.testing.assert_array_equal(got, vecs)
    # float16 input is accepted and stored as float32
    half = _unit(5, 16, seed=9).astype(np.float16)
    store.write_partition("h", [f"h/{i}" for i in range(5)], half, "m1")
    np.testing.assert_array_equal(store.read_partition("h")[1], half.astype(np.float32))


def test_write_refuses_bad_input(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    vecs = _unit(4, 8, 0)
    with pytest.raises(StoreError, match="3 ids for 4 vectors"):
        store.write_partition("p", ["a", "b", "c"], vecs, "m")
    bad = vecs.copy()
    bad[2, 0] = np.nan
    with pytest.raises(StoreError, match="NaN/Inf"):
        store.write_partition("p", list("abcd"), bad, "m")
    with pytest.raises(StoreError, match="non-empty"):
        store.write_partition("", list("abcd"), vecs, "m")
    with pytest.raises(StoreError, match="no partition"):
        store.read_partition("absent")
    assert store.partitions() == []


def test_rewrite_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    _fill(store, {"p": 50})
    new = _unit(3, 16, seed=42)
    store.write_partition("p", ["x", "y", "z"], new, "m2")
    ids, got = store.read_partition("p")
    assert ids == ["x", "y", "z"] and store.models() == {"m2"}
    np.testing.assert_array_equal(got, new)
    assert sorted(p.name for p in store.root.iterdir()) == ["p.parquet"]
    store.delete_partition("p")
    store.delete_partition("p")  # absent: no error
    assert store.partitions() == []


def test_crash_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A process killed while writing a partition leaves the previous file intact and readable."""
    store = EmbeddingStore(tmp_path / "s")
    data = _fill(store, {"p": 20})
    # the child streams a new version of "p"; after the first row groups are on disk it dies
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from dedup_assets.store import EmbeddingStore
        def batches():
            yield [str(i) for i in range(5000)], np.ones((5000, 16), np.float32)
            os._exit(3)
        EmbeddingStore({str(store.root)!r}).write_partition_batches("p", batches(), "m-new", dim=16)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == 3
    leftovers = [p for p in store.root.iterdir() if p.name != "p.parquet"]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name and not leftovers[0].name.endswith(".parquet")
    assert leftovers[0].stat().st_size > 5000 * 16 * 4  # the new rows had reached the disk
    # the old partition is intact and the temp file is not taken for a partition
    assert store.partitions() == ["p"] and store.models() == {"m1"}
    ids, got = store.read_partition("p")
    assert ids == data["p"][0]
    np.testing.assert_array_equal(got, data["p"][1])

    # an exception while streaming (bad batch, a failing source) removes its temp file
    def failing():  # noqa: ANN202
        yield ["a"], np.ones((1, 16), np.float32)
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        store.write_partition_batches("p", failing(), "m-new", dim=16)
    with pytest.raises(StoreError, match=r"must be \(n, 16\)"):
        store.write_partition_batches("p", [(["a"], np.ones((1, 16))), (["b"], np.ones((1, 8)))], "m-new", dim=16)
    assert sorted(p.name for p in store.root.iterdir()) == sorted(["p.parquet", leftovers[0].name])
    assert store.read_partition("p")[0] == data["p"][0]


def test_streamed_write_numbers_rows_across_batches(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    vecs = _unit(10_000, 8, seed=1)
    batches = [([str(i) for i in range(a, min(a + 3000, 10_000))], vecs[a : a + 3000]) for a in range(0, 10_000, 3000)]
    assert store.write_partition_batches("p", iter(batches), "m", dim=8) == 10_000
    rows = pq.read_table(store.path_of("p"), columns=["row"]).column(0).to_numpy()
    np.testing.assert_array_equal(rows, np.arange(10_000))
    np.testing.assert_array_equal(store.read_partition("p")[1], vecs)
    # an empty partition is a valid file of zero rows with its dimension
    assert store.write_partition_batches("e", [], "m", dim=8) == 0
    assert store.counts() == {"e": 0, "p": 10_000} and store.dim() == 8


def test_iter_batches_bounded_and_in_order(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    data = _fill(store, {"a": ROW_GROUP_ROWS + 700, "b": 0, "c": 333})
    for batch_rows in (1000, 64, 100_000):
        seen_ids: list[str] = []
        seen_parts: list[str] = []
        mats = []
        for part, ids, mat in store.iter_batches(batch_rows=batch_rows):
            assert 0 < len(ids) <= batch_rows and mat.shape == (len(ids), 16) and mat.dtype == np.float32
            seen_parts.append(part)
            seen_ids.extend(ids)
            mats.append(mat)
        assert seen_ids == data["a"][0] + data["c"][0]
        assert seen_parts == sorted(seen_parts)
        np.testing.assert_array_equal(np.concatenate(mats), np.concatenate([data["a"][1], data["c"][1]]))
    only_c = list(store.iter_batches(["c"], batch_rows=100))
    assert [len(ids) for _, ids, _ in only_c] == [100, 100, 100, 33]


def test_read_rows_reads_given_positions(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    data = _fill(store, {"a": 3 * ROW_GROUP_ROWS + 5})
    assert pq.ParquetFile(store.path_of("a")).num_row_groups == 4
    rows = np.array([3 * ROW_GROUP_ROWS + 4, 0, 17, ROW_GROUP_ROWS, 17])
    np.testing.assert_array_equal(store.read_rows("a", rows), data["a"][1][rows])
    assert store.read_rows("a", np.array([], dtype=np.int64)).shape == (0, 16)
    with pytest.raises(StoreError, match="outside"):
        store.read_rows("a", np.array([3 * ROW_GROUP_ROWS + 5]))


def test_sample_deterministic_uniform_without_replacement(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "s")
    sizes = {"a": 600, "b": 100, "c": 300}
    data = _fill(store, sizes)
    by_id = {i: v for ids, vecs in data.values() for i, v in zip(ids, vecs)}
    ids1, m1 = store.sample(200, seed=5)
    ids2, m2 = store.sample(200, seed=5)
    assert ids1 == ids2 and np.array_equal(m1, m2)
    assert store.sample(200, seed=6)[0] != ids1
    assert len(ids1) == 200 == len(set(ids1))  # without replacement
    for i, v in zip(ids1, m1):  # each vector is the one stored for that id
        np.testing.assert_array_equal(v, by_id[i])
    # more than there is: every row exactly once
    all_ids, all_m = store.sample(5000, seed=1)
    assert sorted(all_ids) == sorted(by_id) and all_m.shape == (1000, 16)
    # uniform: over many seeds, each partition's share of the sample tracks its share of the rows,
    # and every row is picked about equally often
    hits = {k: 0 for k in sizes}
    per_row = np.zeros(1000)
    index = {i: j for j, i in enumerate(sorted(by_id))}
    for seed in range(300):
        ids, _ = store.sample(100, seed=seed)
        for i in ids:
            hits[i.split("/")[0]] += 1
            per_row[index[i]] += 1
    for k, n in sizes.items():
        assert abs(hits[k] / 30_000 - n / 1000) < 0.01
    # each row is picked Binomial(300, 0.1) times: mean 30, sd ~5.2
    assert abs(per_row.mean() - 30) < 1e-9 and per_row.std() < 7 and per_row.min() > 5
    assert store.sample(10, seed=0, partitions=["b"])[0][0].startswith("b/")
    assert store.sample(0, seed=0)[1].shape == (0, 16)
    assert EmbeddingStore(tmp_path / "empty").sample(5, seed=0)[1].shape == (0, 0)


@pytest.mark.parametrize(
    "key",
    ["00001", "a/b", "../../etc/passwd", ".hidden", "..", "with space", "100%", "a~b", "ünï/cødé", "x" * 300,
     "shard.tar", "CON", "a\nb"],
)
def test_odd_partition_keys_are_safe_file_names(tmp_path: Path, key: str) -> None:
    name = escape_key(key)
    assert "/" not in name and not name.startswith(".") and len(name.encode()) <= 200
    assert name == key or unescape_name(name) in (key, None)
    store = EmbeddingStore(tmp_path / "s")
    store.write_partition(key, ["i"], np.ones((1, 4), np.float32), "m")
    assert [p.parent for p in store.root.iterdir()] == [store.root]
    assert store.partitions() == [key]
    assert store.read_partition(key)[0] == ["i"]
    # keys that differ only in case or in an escaped byte get different files
    store.write_partition(key + "%", ["j"], np.ones((1, 4), np.float32), "m")
    assert store.partitions() == sorted([key, key + "%"])
