"""Scale-out on an existing engine: the same assets executed step by step by a Celery worker (a
separate process that could as well run on another machine), with a Redis broker on loopback.
The warehouse rows must equal those of the in-process path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from dedup_assets.defs.partitions import SHARDS_PARTITIONS_NAME
from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset

REDIS = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (make test installs it)")
def test_celery_workers_run_the_shard_and_corpus_jobs_with_buckets_on_two_workers(
    small_dataset: SmallDataset, tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    broker = {"broker": f"redis://127.0.0.1:{port}/0", "backend": f"redis://127.0.0.1:{port}/1"}
    warehouse = tmp_path / "wh.duckdb"
    settings = {
        "DEDUP_ASSETS_SOURCE": str(small_dataset.root),
        "DEDUP_ASSETS_WAREHOUSE": str(warehouse),
        "DEDUP_ASSETS_GENERATED": str(small_dataset.generated),
        "DEDUP_ASSETS_MIN_SIDE": "64",
    }
    for k, v in settings.items():  # the code location reads its settings from the environment
        monkeypatch.setenv(k, v)
    (tmp_path / "celery.yaml").write_text(
        f"execution:\n  config:\n    broker: {broker['broker']}\n    backend: {broker['backend']}\n"
        # one task at a time per worker, so the bucket steps submitted together go to both workers
        "    config_source:\n      worker_prefetch_multiplier: 1\n      task_acks_late: true\n"
    )
    bin_dir = str(Path(sys.executable).parent)
    redis = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )
    workers: list[subprocess.Popen] = []
    try:
        _wait_port(port, 30)
        for name in ("w1", "w2"):
            workers.append(subprocess.Popen(
                [os.path.join(bin_dir, "dagster-celery"), "worker", "start", "-y", str(tmp_path / "celery.yaml"),
                 "-A", "dagster_celery.app", "-n", f"{name}@%h", "--", "--pool", "solo"],
                cwd=tmp_path,
                env={**os.environ, **settings, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
                     "DAGSTER_HOME": str(tmp_path / "dagster_home")},
                stdout=open(tmp_path / "worker.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
            ))
        time.sleep(4)
        assert all(w.poll() is None for w in workers), (tmp_path / "worker.log").read_text()[-3000:]
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, small_dataset.shards)
        repo = ReconstructableRepository.for_module("dedup_assets.definitions", "defs", working_directory=str(tmp_path))
        run_config = {"execution": {"config": broker}}
        for shard in small_dataset.shards:
            with execute_job(repo.get_reconstructable_job("shard_job_celery"), instance=instance,
                             run_config=run_config, tags={"dagster/partition": shard}) as result:
                assert result.success, (tmp_path / "worker.log").read_text()[-3000:]
                assert any("Executing steps" in (e.message or "") and "celery" in (e.message or "").lower()
                           for e in result.all_events)
        with execute_job(repo.get_reconstructable_job("corpus_job_celery"), instance=instance,
                         run_config=run_config) as result:
            assert result.success, (tmp_path / "worker.log").read_text()[-3000:]
            logs = [e for e in instance.all_logs(result.run_id)
                    if e.step_key and e.step_key.startswith("candidate_pairs.search_bucket[")]
            bucket_steps = {e.step_key for e in logs}
            bucket_groups = {int(m.group(1)) for e in logs
                             for m in [re.search(r"\(group (\d+)\)", e.user_message or "")] if m}
    finally:
        for w in workers:
            _stop(w)
        _stop(redis)
    # the corpus stage fanned out: at least two bucket steps, run by both worker processes
    assert len(bucket_steps) >= 2, bucket_steps
    assert bucket_groups == {w.pid for w in workers}, (bucket_groups, [w.pid for w in workers])

    wh = Warehouse(warehouse)
    index = wh.read_table("image_index")
    assert sorted(index["shard"].unique().to_list()) == small_dataset.shards
    kept, removed = wh.read_table("filtered_dataset"), wh.read_table("removed_images")
    assert kept.height + removed.height == index.height
    grouped = set(wh.read_table("duplicate_groups")["image_id"].to_list())
    assert set(small_dataset.planted) <= grouped
    flagged = set(wh.query("SELECT generated FROM regurgitation_audit WHERE flagged")["generated"].to_list())
    assert set(small_dataset.generated_copies) <= flagged
