"""benchmarks/bench_corpus_scale.py cannot rot: its --quick path runs end to end (data in the
clip-retrieval layout → `dedup-assets run --embeddings` under a memory cap → truth, brute force,
faiss IVF, table, JSON), and its recall arithmetic has known answers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_corpus_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_corpus_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_recall_counts_pairs_incident_to_the_sampled_rows() -> None:
    bench = _bench()
    # Rows 0..3; true pairs (0,1), (0,2), (2,3); the run found (0,1) and (2,3) and a spurious (1,3).
    truth = bench.truth_from_pairs(np.array([0, 0, 2]), np.array([1, 2, 3]), 4)
    assert [t.tolist() for t in truth.partners] == [[1, 2], [0], [0, 3], [2]]
    found = [np.array([1]), np.array([0, 3]), np.array([3]), np.array([1, 2])]
    rec = bench.recall_of(truth, found, seed=0)
    assert rec["true_pairs"] == 6 and rec["found"] == 4  # each pair counted at both its rows
    assert rec["recall"] == 4 / 6 and rec["ci_low"] <= 4 / 6 <= rec["ci_high"]
    assert bench.row_of("emb_3/0000001234") == 1234 and bench.row_of("emb_0/copy_0000000007") == 7


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets:" in proc.stdout and "× brute" in proc.stdout
    (r,) = json.loads(out.read_text())["results"]
    assert r["run_ok"] and r["n"] == 3000 and r["files"] == 2
    assert r["memory"]["within_cap"] and r["memory"]["peak_summed_rss_gb"] > 0.05
    assert r["memory"]["method"] in ("cgroup v2", "cgroup v1", "sampling")
    rows = {a["asset"]: a["rows"] for a in r["assets"]}
    assert rows["image_index"] == rows["embeddings"] == 3000
    assert rows["candidate_pairs"] > 1000 and rows["regurgitation_audit"] > 0
    # Exact truth at this size; the data model puts most pairs in topic cores.
    assert r["recall"]["method"] == "exact (all pairs)" and r["recall"]["recall"] > 0.95
    assert r["truth_kinds"]["core_core"] > 0.5
    assert r["brute"]["method"] == "measured on all rows"
    f = r["faiss_ivf"]
    assert f["reached"] and f["recall"] >= r["recall"]["recall"] and f["seconds"] > 0
    assert r["audit"]["copies_found_at_rank1"] == r["audit"]["copies"] == 10
    assert r["audit"]["novel_flagged"] == 0
