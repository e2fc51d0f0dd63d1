"""The Dagster instance as the CLI uses it: created once under a lock, runs of killed CLI
processes recovered, and the per-shard resume record.

- `open_instance(home)`: two `dedup-assets run` started at once on a new DAGSTER_HOME would both
  create the instance's SQLite storage and one fails (`table alembic_version already exists`), so
  the instance is created, and each of its storages touched, under an exclusive `fcntl` lock on
  `<home>/.dedup-assets.lock`.
- `recover_stale_runs(instance)`: every run the CLI launches carries the tag
  `dedup-assets/process` = `<host>:<pid>:<process start time>`. A run of this host still marked
  queued/starting/started/canceling whose process is gone (kill -9, OOM, power loss) is marked
  failed and the concurrency-pool slots it held are freed; otherwise every later step of the
  `gpu` pool would wait for them forever.
- `ShardState`: the resume record. A shard is skipped when its fingerprint (see
  `dedup_assets.ingest.shards.shard_fingerprint`) and the digest of the per-shard configuration
  equal those recorded after its last successful per-shard run (table `shard_state` in the
  warehouse); `--force` redoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator


PROCESS_TAG = "dedup-assets/process"
ACTIVE_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")


@contextmanager
def instance_lock(home: Path, timeout_s: float = 300.0) -> Iterator[None]:
    from dedup_assets.warehouse import exclusive_file_lock

    home.mkdir(parents=True, exist_ok=True)
    lock = home / ".dedup-assets.lock"
    stuck = RuntimeError(
        f"another dedup-assets process has held {lock} for {timeout_s:.0f}s while creating the "
        "Dagster instance; is one stuck?"
    )
    with exclusive_file_lock(lock, timeout_s, stuck, poll_s=0.1):
        yield


def open_instance(home: Path):  # noqa: ANN201 - DagsterInstance, imported lazily
    """The persistent instance of DAGSTER_HOME=`home`, its storage created once under a lock."""
    from dagster import DagsterInstance

    with instance_lock(home):
        os.environ["DAGSTER_HOME"] = str(home)
        instance = DagsterInstance.get()
        # Touch every storage so that its tables exist before the lock is released.
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("__dedup_assets_init__")
        instance.all_instigator_state()
    return instance


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def process_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def _alive(tag: str) -> bool | None:
    """True/False for a process of this host; None when the tag names another host (unknown)."""
    try:
        host, pid_s, start = tag.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    now = _start_time(pid)
    if now is None:
        return False
    return start == "?" or now == start


def recover_stale_runs(instance) -> list[str]:  # noqa: ANN001
    """Mark runs of dead CLI processes of this host failed and free their pool slots; their ids."""
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus[s] for s in ACTIVE_STATUSES if s in DagsterRunStatus.__members__]
    recovered = []
    for run in instance.get_runs(filters=RunsFilter(statuses=statuses)):
        tag = run.tags.get(PROCESS_TAG)
        if tag is None or _alive(tag) is not False:
            continue
        instance.report_run_failed(
            run, message=f"the dedup-assets process that ran this run ({tag}) is gone; marked failed"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


# ----------------------------------------------------------------------------------- resume
def config_digest(config: dict[str, Any]) -> str:
    """A short digest of the settings that change what the per-shard assets write."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShardState:
    """The resume record (table `shard_state`): one row per shard, written after its per-shard
    run succeeded."""

    def __init__(self, wh) -> None:  # noqa: ANN001 - a dedup_assets.warehouse.Warehouse
        self.wh = wh

    def recorded(self) -> dict[str, tuple[str, str]]:
        from dedup_assets.tables import read_shard_state

        return {r["shard"]: (r["fingerprint"], r["config"]) for r in read_shard_state(self.wh).iter_rows(named=True)}

    def record(self, shard: str, fingerprint: str, config: str, run_id: str) -> None:
        from dedup_assets.tables import write_shard_state

        write_shard_state(self.wh, {
            "shard": shard, "fingerprint": fingerprint, "config": config, "run_id": run_id,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })

    def forget(self, shard: str) -> None:
        from dedup_assets.tables import delete_shard_state

        delete_shard_state(self.wh, shard)
