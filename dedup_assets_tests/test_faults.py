"""Faults (issue: hardening): a killed run, concurrent first use of a DAGSTER_HOME, a write error
whose cause must not be hidden, and a hostile dataset run end to end through the CLI.

Everything runs in real subprocesses with hard timeouts, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import signal
import subprocess
import sys
import tarfile
import io
import time
from pathlib import Path

import duckdb

from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.test_cli import _cli

CANARY = "CANARY-91d2-host-secret"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_") and k != "DAGSTER_HOME"}


def _run_cmd(source: Path, wh: Path, home: Path, *extra: str) -> list[str]:
    return _cli() + ["run", "--source", str(source), "--warehouse", str(wh), "--dagster-home", str(home),
                     "--min-side", "64", *extra]


def _kill_when(cmd: list[str], marker: str, cwd: Path, timeout: float = 300) -> str:
    """Start `cmd`, SIGKILL it as soon as a line containing `marker` appears; its output so far."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out, buf, deadline = [], b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            out.extend(line.decode("utf-8", "replace") for line in lines)
            if any(marker in line for line in out):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return "\n".join(out)
        raise AssertionError(f"{marker!r} never appeared:\n" + "\n".join(out[-40:]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_a_killed_run_leaves_nothing_that_blocks_the_next_and_the_rerun_resumes(
    small_dataset: SmallDataset, tmp_path: Path
) -> None:
    wh, home = tmp_path / "out" / "warehouse.duckdb", tmp_path / "home"
    cmd = _run_cmd(small_dataset.root, wh, home)
    out = _kill_when(cmd, " - clusterings - ", tmp_path)  # killed inside the corpus stage
    assert "per-shard stage" in out

    from dagster import DagsterInstance, DagsterRunStatus

    with DagsterInstance.from_config(str(home)) as inst:
        stale = [r for r in inst.get_runs() if r.status == DagsterRunStatus.STARTED]
    assert len(stale) == 1  # what used to block every later gpu-pool step forever

    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "recovered 1 run(s)" in out
    assert out.count("unchanged since its last successful run, skipped") == 2  # resumed
    assert "corpus stage: ok" in out
    with DagsterInstance.from_config(str(home)) as inst:
        assert inst.get_run_by_id(stale[0].run_id).status == DagsterRunStatus.FAILURE
    with duckdb.connect(str(wh), read_only=True) as con:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        for table, key in [("image_index", "image_id"), ("embeddings", "image_id"), ("prefilter", "image_id"),
                           ("filtered_dataset", "image_id"), ("removed_images", "image_id")]:
            assert q(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}") == [(0,)], table
        (indexed,), = q("SELECT count(*) FROM image_index")
        (kept,), = q("SELECT count(*) FROM filtered_dataset")
        (removed,), = q("SELECT count(*) FROM removed_images")
        assert indexed == kept + removed and indexed > 0
    # --force redoes the shards.
    proc = subprocess.run(cmd + ["--force"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0 and "skipped (--force" not in proc.stdout, proc.stdout[-3000:]
    assert "[2/2] shard s1" in proc.stdout and "images/s" in proc.stdout


def _open(home: str, q: "mp.Queue[str]") -> None:
    try:
        from dedup_assets.instance import open_instance

        inst = open_instance(Path(home))
        inst.add_dynamic_partitions("shards", [f"p{os.getpid()}"])
        q.put("ok")
    except Exception as e:  # noqa: BLE001
        q.put(f"{type(e).__name__}: {e}")


def test_concurrent_first_use_of_a_dagster_home_initialises_once(tmp_path: Path) -> None:
    home = tmp_path / "fresh_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(str(home), q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4, results

    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as inst:
        assert len(inst.get_dynamic_partitions("shards")) == 4


_WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np, polars as pl
from dedup_assets.warehouse import Warehouse
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
wh = Warehouse(sys.argv[1])
wh.replace_table("small", pl.DataFrame({"a": [1]}))
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
df = pl.DataFrame({"x": np.random.default_rng(0).random(2_000_000), "shard": ["p"] * 2_000_000})
wh.replace_partition("big", df, "shard", "p")
"""


def test_a_write_error_reports_its_first_cause_not_the_rollback(tmp_path: Path) -> None:
    # Like a full disk: the file cannot grow. The message must name that, not "cannot rollback".
    proc = subprocess.run([sys.executable, "-c", _WRITE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path / "w.duckdb")],
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "File too large" in last and "rollback" not in last.lower(), proc.stderr[-2000:]


# --------------------------------------------------------------------- hostile dataset via the CLI
def _hostile_root(tmp_path: Path) -> Path:
    from dedup_assets.synth.hostile import hostile_files, write_folder_shard

    h = hostile_files()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(CANARY)
    (outside / "meta.json").write_text('{"url": "https://%s.example"}' % CANARY)
    (outside / "photo.jpg").write_bytes(h["cmyk.jpg"])
    root = tmp_path / "root"
    good = {f"g{i}.jpg": h["cmyk.jpg"] for i in range(1)} | {"w.webp": h["image.webp"]}
    s = write_folder_shard(root / "s0", good, captions={"g0": "a calm scene by the sea", "w": "a webp image"})
    os.symlink(outside / "photo.jpg", s / "stolen.jpg")
    os.symlink(outside / "secret.txt", s / "host.jpg")
    os.symlink(outside / "secret.txt", s / "w.txt.tmp")
    os.replace(s / "w.txt.tmp", s / "w.txt")  # the caption of w.webp is a link out of the root
    os.symlink(outside / "meta.json", s / "g0.json")
    os.mkfifo(s / "pipe.jpg")
    os.mkfifo(s / "pipe.txt")
    with open(s / "sparse.jpg", "wb") as f:
        f.truncate(10 * 2**30)
    (s / "deep.png").write_bytes(h["gray16.png"])
    (s / "deep.json").write_text('{"a": ' * 800 + "1" + "}" * 800)
    (s / "big.jpg").write_bytes(h["cmyk.jpg"])
    (s / "big.txt").write_bytes(b"spam " * 2_000_000)  # 10 MB caption
    (s / "orphan.txt").write_text("no image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(h["cmyk.jpg"])
    bidi = root / "evil\u202etxt.tar"
    with tarfile.open(bidi, "w") as tf:
        for name, data in [("a.jpg", h["cmyk.jpg"]), ("b.png", h["gray16.png"]), ("a.jpg", h["image.webp"]),
                           ("../../etc/x.jpg", h["cmyk.jpg"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("hard.jpg")
        info.type, info.linkname = tarfile.LNKTYPE, "b.png"
        tf.addfile(info)
        info = tarfile.TarInfo("sym.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, str(outside / "photo.jpg")
        tf.addfile(info)
    return root


def test_a_hostile_dataset_runs_to_the_end_and_nothing_outside_the_root_is_read(tmp_path: Path) -> None:
    root = _hostile_root(tmp_path)
    wh, home = tmp_path / "out" / "warehouse.duckdb", tmp_path / "home"
    proc = subprocess.run(_run_cmd(root, wh, home), env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=480)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "\u202e" not in out and "evil%E2%80%AEtxt" in out
    with duckdb.connect(str(wh), read_only=True) as con:
        status = dict(con.execute("SELECT image_id, status FROM image_index").fetchall())
        skipped = {(s, e, r) for s, e, r in con.execute("SELECT shard, entry, reason FROM skipped_entries").fetchall()}
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        dump = "\n".join(str(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)
    assert status["s0/stolen"] == status["s0/host"] == "outside_root"
    assert status["s0/pipe"] == "not_a_regular_file" and status["s0/sparse"] == "too_large_file"
    assert status["s0/deep"] == status["s0/big"] == status["s0/g0"] == "ok"
    t = "evil%E2%80%AEtxt"
    assert status[f"{t}/a"] == status[f"{t}/a.jpg"] == status[f"{t}/hard"] == "ok"
    assert status[f"{t}/sym"] == "outside_root"
    assert ("s0", "orphan.txt", "orphan_sidecar") in skipped
    assert (t, "../../etc/x.jpg", "unsafe_member_name") in skipped
    assert ("", ".hidden", "hidden") in skipped
    # The canary is nowhere: not in any table, export, manifest or review page.
    assert CANARY not in dump
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert CANARY.encode() not in p.read_bytes(), p
