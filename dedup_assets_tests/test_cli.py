"""The headless CLI: `dedup-assets run --source … --generated …` end to end, in a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
from dagster import DagsterInstance

from dedup_assets_tests.conftest import SmallDataset


def _cli() -> list[str]:
    exe = shutil.which("dedup-assets", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "dedup_assets.cli"]


def test_run_end_to_end_through_the_console_script(small_dataset: SmallDataset, tmp_path: Path) -> None:
    wh = tmp_path / "out" / "warehouse.duckdb"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_") and k != "DAGSTER_HOME"}
    cmd = _cli() + [
        "run", "--source", str(small_dataset.root), "--generated", str(small_dataset.generated),
        "--warehouse", str(wh), "--dagster-home", str(home), "--min-side", "64",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    # The audit check fails by design (the generated folder holds near-copies); a failed check is
    # reported in the summary, while the run itself succeeds.
    assert proc.returncode == 0, out
    assert "[2/2] shard s1" in out and "images/s" in out
    assert "Summary" in out and "check no_regurgitation" in out
    with duckdb.connect(str(wh), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"image_index", "prefilter", "embeddings", "clusterings", "candidate_pairs",
                "duplicate_groups", "filtered_dataset", "removed_images", "regurgitation_audit"} <= tables
        flagged = {r[0] for r in con.execute("SELECT DISTINCT generated FROM regurgitation_audit WHERE flagged").fetchall()}
    assert set(small_dataset.generated_copies) <= flagged
    # The runs were recorded in the persistent instance, so the UI shows them.
    with DagsterInstance.from_config(str(home)) as inst:
        assert sorted(inst.get_dynamic_partitions("shards")) == ["s0", "s1"]
        assert len(inst.get_run_records()) == 3


def test_run_fails_clearly_on_a_missing_source(tmp_path: Path) -> None:
    proc = subprocess.run(
        _cli() + ["run", "--source", str(tmp_path / "nope"), "--warehouse", str(tmp_path / "w.duckdb")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "is not a directory" in proc.stdout


def test_openclip_hub_tag_fails_fast_with_instructions(small_dataset: SmallDataset, tmp_path: Path) -> None:
    proc = subprocess.run(
        _cli() + ["run", "--source", str(small_dataset.root), "--warehouse", str(tmp_path / "w.duckdb"),
                  "--dagster-home", str(tmp_path / "home"), "--embedder", "openclip",
                  "--pretrained", "laion2b_s34b_b79k"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"} | {"HF_HUB_OFFLINE": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "--embedder offline" in out and "Traceback" not in out
