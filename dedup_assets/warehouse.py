"""The DuckDB warehouse: one table per asset, readable by a user with plain `duckdb`.

Grain and columns of every table are documented in the README. This module knows nothing of
Dagster; the `WarehouseResource` in `dedup_assets.defs.resources` wraps it.

Concurrency: DuckDB lets one process hold a database file open for writing at a time, and a
second process that tries gets an IO error. Every access here therefore goes through an
exclusive `fcntl` lock on a sidecar file (`<warehouse>.lock`), held only for the duration of one
short transaction, so partitions materialized concurrently in different processes queue for the
file instead of failing or corrupting it. Writes of one partition run in a single transaction
(delete the partition's rows, insert the new ones), so a re-materialized shard replaces its rows
and a crash leaves the old rows in place.

Identifiers come from this package's fixed table names (validated); values such as shard names
are always bound as parameters, never formatted into SQL.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import numpy as np
import polars as pl

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WarehouseError(RuntimeError):
    """A warehouse operation that cannot proceed, with a message that says what to do."""


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise WarehouseError(f"invalid table or column name {name!r}")
    return f'"{name}"'


@contextmanager
def exclusive_file_lock(path: Path, timeout_s: float, on_timeout: Exception, poll_s: float = 0.05) -> Iterator[None]:
    """Hold an exclusive `fcntl` lock on `path` (created if missing) for the block; raise
    `on_timeout` when another process keeps it longer than `timeout_s`."""
    with open(path, "a+") as lock_file:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise on_timeout from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit over this process's own cgroup and its ancestors (v2 `memory.max`,
    v1 `memory.limit_in_bytes`), or None when there is none. Reading only the root files would miss
    the limit of a child cgroup the process was put in (a benchmark's cap, a systemd slice, a
    Kubernetes pod on a host without cgroup namespaces)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in [rel, *rel.parents]:  # own cgroup first, then every ancestor up to the root
            candidates.append(base / d / name)
    candidates += [Path(root) / "memory.max", Path(root) / "memory" / "memory.limit_in_bytes"]
    limits = []
    for f in candidates:
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 50):
            limits.append(int(raw))
    return min(limits) if limits else None


def duckdb_memory_limit() -> str:
    """DuckDB's memory_limit for our connections: `DEDUP_ASSETS_DUCKDB_MEMORY` when set (e.g. '2GB'),
    else 40 % of this process's memory cgroup limit, or of physical memory when there is none.

    DuckDB's own default (80 % of physical memory) ignores the cgroup, so under a hard cap its hash
    aggregates would grow until the kernel kills the step instead of spilling to disk."""
    explicit = os.environ.get("DEDUP_ASSETS_DUCKDB_MEMORY")
    if explicit:
        return explicit
    total = _cgroup_limit()
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return "4GB"
    return f"{max(256, int(total * 0.4) >> 20)}MB"


class Warehouse:
    """A DuckDB file plus the lock that serializes access to it across processes."""

    def __init__(self, path: str | os.PathLike[str], lock_timeout_s: float = 600.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An open connection, held under the cross-process lock; closed on exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        timeout = WarehouseError(
            f"timed out after {self.lock_timeout_s:.0f}s waiting for the lock on "
            f"{self.path}; another process holds it (see {self.lock_path})"
        )
        with exclusive_file_lock(self.lock_path, self.lock_timeout_s, timeout):
            con = duckdb.connect(str(self.path), config={"memory_limit": duckdb_memory_limit()})
            try:
                yield con
            finally:
                con.close()

    # ----------------------------------------------------------------------------------- reads
    def table_exists(self, table: str) -> bool:
        if not self.path.exists():
            return False
        with self.connect() as con:
            return _table_exists(con, table)

    def query(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
        """Run a read query and return a polars frame (params are bound, never formatted)."""
        with self.connect() as con:
            return con.sql(sql, params=params).pl()

    def read_table(
        self,
        table: str,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        params: Mapping[str, Any] | None = None,
        order_by: str | None = None,
    ) -> pl.DataFrame:
        """Read a whole table (or a filtered part); missing table → clear error."""
        cols = ", ".join(_ident(c) for c in columns) if columns else "*"
        sql = f"SELECT {cols} FROM {_ident(table)}"
        if where:
            sql += f" WHERE {where}"
        if order_by:
            sql += f" ORDER BY {order_by}"
        with self.connect() as con:
            if not _table_exists(con, table):
                raise WarehouseError(
                    f"table {table!r} does not exist in {self.path}: materialize the asset "
                    f"{table!r} (and its upstream assets) first"
                )
            return con.sql(sql, params=params).pl()

    def read_vectors(
        self,
        table: str,
        id_column: str,
        vector_column: str,
        where: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """Ids and a contiguous (n, d) float32 matrix from a `FLOAT[d]` column, ordered by id."""
        sql = f"SELECT {_ident(id_column)}, {_ident(vector_column)} FROM {_ident(table)}"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {_ident(id_column)}"
        with self.connect() as con:
            if not _table_exists(con, table):
                raise WarehouseError(f"table {table!r} does not exist in {self.path}")
            tbl = con.sql(sql, params=params).to_arrow_table()
        ids = tbl.column(0).to_pylist()
        col = tbl.column(1).combine_chunks()
        if len(ids) == 0:
            return [], np.zeros((0, 0), dtype=np.float32)
        d = col.type.list_size
        mat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return ids, np.ascontiguousarray(mat.reshape(len(ids), d))

    # ---------------------------------------------------------------------------------- writes
    def replace_partition(
        self, table: str, df: pl.DataFrame, partition_column: str, partition_value: str
    ) -> int:
        """Replace the rows of one partition (e.g. one shard) in one transaction; returns rows written."""
        if partition_column not in df.columns:
            raise WarehouseError(f"frame for {table!r} lacks partition column {partition_column!r}")
        bad = df.filter(pl.col(partition_column) != partition_value).height
        if bad:
            raise WarehouseError(
                f"{bad} rows for {table!r} do not belong to partition {partition_value!r}"
            )
        return self._write(table, df, delete_where=(partition_column, partition_value))

    def replace_table(self, table: str, df: pl.DataFrame) -> int:
        """Replace a whole (unpartitioned) table; returns rows written."""
        return self._write(table, df, delete_where=None)

    def delete_partition(self, table: str, partition_column: str, partition_value: str) -> None:
        with self.connect() as con:
            if _table_exists(con, table):
                con.execute(
                    f"DELETE FROM {_ident(table)} WHERE {_ident(partition_column)} = ?",
                    [partition_value],
                )

    def _write(self, table: str, df: pl.DataFrame, delete_where: tuple[str, str] | None) -> int:
        t = _ident(table)
        with self.connect() as con:
            con.register("__incoming", df)
            try:
                with transaction(con):
                    if delete_where is None:
                        con.execute(f"CREATE OR REPLACE TABLE {t} AS SELECT * FROM __incoming")
                    else:
                        if not _table_exists(con, table):
                            con.execute(f"CREATE TABLE {t} AS SELECT * FROM __incoming LIMIT 0")
                        else:
                            _check_same_columns(con, table, df)
                        col, value = delete_where
                        con.execute(f"DELETE FROM {t} WHERE {_ident(col)} = ?", [value])
                        con.execute(f"INSERT INTO {t} BY NAME SELECT * FROM __incoming")
            finally:
                con.unregister("__incoming")
        return df.height


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN … COMMIT around the block; ROLLBACK and re-raise on any error."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except Exception:
        # Report the first error (e.g. "No space left on device"), not the rollback's:
        # after an IO error DuckDB has often aborted the transaction already.
        try:
            con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001
            pass
        raise


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether `table` (or a view of that name) exists in the main schema of an open connection."""
    return _table_exists(con, table)


def _table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    # fetchall, not fetchone: duckdb 2 refuses new work on a connection with an unfinished result
    rows = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'",
        [table],
    ).fetchall()
    return bool(rows and rows[0][0])


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """Column names of `table` in the main schema, in order ([] when it does not exist)."""
    return [
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "AND table_schema = 'main' ORDER BY ordinal_position",
            [table],
        ).fetchall()
    ]


def _check_same_columns(con: duckdb.DuckDBPyConnection, table: str, df: pl.DataFrame) -> None:
    existing = table_columns(con, table)
    if existing != list(df.columns):
        raise WarehouseError(
            f"table {table!r} has columns {existing} but this version writes {list(df.columns)}; "
            f"drop it (DROP TABLE {table}) or use a fresh warehouse file, then re-materialize"
        )
