"""The headless CLI: `dedup-assets run --source … --generated …` end to end, in a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
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
        records = inst.get_run_records()
        assert len(records) == 3
        assert sorted(r.dagster_run.job_name for r in records) == ["corpus_job", "shard_job", "shard_job"]
    # the settings file for the UI: this run's folders and minimum side
    written = (home / "dedup_assets.env").read_text()
    assert f"DEDUP_ASSETS_GENERATED={small_dataset.generated.resolve()}" in written and "DEDUP_ASSETS_MIN_SIDE=64" in written

    # labels of a label set, then a second run: unchanged shards are skipped, the set's classifier is
    # trained in its own partition (classifier_job) before the corpus job uses it
    with duckdb.connect(str(wh), read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT image_id FROM filtered_dataset ORDER BY image_id").fetchall()]
    label = subprocess.run(_cli() + ["label", "--set", "clutter", "--positive", *ids[:6], "--negative", *ids[-6:],
                                     "--warehouse", str(wh), "--dagster-home", str(home)],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert label.returncode == 0 and "partition 'clutter' of label_sets added" in label.stdout, label.stdout + label.stderr
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "label set clutter: classifier ok" in out, out
    assert out.count("unchanged since its last successful run, skipped") == 2
    with duckdb.connect(str(wh), read_only=True) as con:
        scored, removed = con.execute("SELECT count(*), count(*) FILTER (WHERE remove) FROM classifier_scores "
                                      "WHERE label_set = 'clutter'").fetchone()
        by_reason = con.execute("SELECT count(*) FROM removed_images WHERE reason = 'filter:classifier:clutter'").fetchone()[0]
    assert scored > len(ids) and removed >= 6 and by_reason >= 1
    with DagsterInstance.from_config(str(home)) as inst:
        jobs = [r.dagster_run for r in inst.get_run_records()]
        assert [(r.job_name, r.tags.get("dagster/partition")) for r in jobs if r.job_name == "classifier_job"] == \
            [("classifier_job", "clutter")]


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


def _byo_dataset(root: Path, gen_root: Path) -> tuple[set[tuple[str, str]], list[str]]:
    """2 file pairs × 300 vectors (float16 and float32) with planted near-copies (cosine 0.97),
    one NaN row and one zero row; generated vectors: 2 near-copies of training rows, 1 novel."""
    from dedup_assets.dedup.synthetic import perturb_to_cosine
    from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair

    rng = np.random.default_rng(7)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[300:320] = perturb_to_cosine(x[0:20], np.full(20, 0.97), rng)  # copies across the two files
    x[40:50] = perturb_to_cosine(x[30:40], np.full(10, 0.97), rng)  # copies inside the first file
    x[5] = np.nan  # a base whose vector is broken: its pair cannot exist
    x[307] = 0.0  # a copy whose vector is zero
    meta = [laion_metadata(300, 0), laion_metadata(300, 1)]
    write_clip_pair(root, 0, x[:300].astype(np.float16), meta[0])
    write_clip_pair(root, 1, x[300:], meta[1])
    ids = [f"emb_{p}/{k}" for p in (0, 1) for k in meta[p]["key"].to_list()]
    xs = np.concatenate([x[:300].astype(np.float16).astype(np.float32), x[300:]])
    good = np.isfinite(xs).all(axis=1) & (np.abs(xs).sum(axis=1) > 0)
    xs[good] /= np.linalg.norm(xs[good], axis=1, keepdims=True)
    sims = np.where(good[:, None] & good[None, :], xs @ xs.T, -1.0)
    exact = {tuple(sorted((ids[i], ids[j]))) for i, j in zip(*np.nonzero(np.triu(sims, 1) >= 0.9))}
    novel = rng.standard_normal((1, 32)).astype(np.float32)
    write_clip_pair(gen_root, 0, np.concatenate([x[[10, 100]], novel / np.linalg.norm(novel)]),
                    {"key": ["copy10", "copy100", "novel"], "caption": ["p1", "p2", "p3"]})
    return exact, [ids[10], ids[100]]


def test_run_with_own_embeddings_end_to_end(tmp_path: Path) -> None:
    root, gen = tmp_path / "emb", tmp_path / "gen"
    exact, copied = _byo_dataset(root, gen)
    assert len(exact) == 28  # 30 planted, minus the NaN base's and the zero copy's
    wh = tmp_path / "out" / "warehouse.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_") and k != "DAGSTER_HOME"}
    base = _cli() + ["run", "--embeddings", str(root), "--warehouse", str(wh), "--dagster-home", str(tmp_path / "home")]
    proc = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "pass --threshold T" in proc.stdout and "Traceback" not in proc.stdout
    proc = subprocess.run(base + ["--threshold", "0.9", "--model-id", "clip-vit-b32", "--generated-embeddings", str(gen)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[2/2] partition emb_1: 300 rows" in out and "check filtered_dataset_accounting passed" in out

    with duckdb.connect(str(wh), read_only=True) as con:
        def q(sql: str) -> list[tuple]:
            return con.execute(sql).fetchall()

        assert q("SELECT shard, status, count(*) FROM image_index GROUP BY ALL ORDER BY ALL") == [
            ("emb_0", "bad_embedding", 1), ("emb_0", "ok", 299), ("emb_1", "bad_embedding", 1), ("emb_1", "ok", 299)]
        assert q("SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'") == [("VIEW",)]
        assert q("SELECT model, count(*) FROM embeddings GROUP BY model") == [("clip-vit-b32", 598)]
        pairs = {(a, b) for a, b in q("SELECT image_a, image_b FROM candidate_pairs")}
        assert pairs == exact
        groups = q("SELECT count(*) FILTER (WHERE is_keeper), count(*) FROM duplicate_groups")
        assert groups == [(28, 56)]
        removed = dict(q("SELECT split_part(reason, ':', 1), count(*) FROM removed_images GROUP BY 1"))
        assert removed == {"decode": 2, "duplicate_of": 28}
        kept = q("SELECT count(*), round(avg(weight), 6) FROM filtered_dataset")
        assert kept == [(570, 1.0)]
        flagged = q("SELECT generated, image_id FROM regurgitation_audit WHERE flagged AND rank = 1 ORDER BY generated")
        n_flagged = q("SELECT count(DISTINCT generated) FROM regurgitation_audit WHERE flagged")
    assert flagged == [("emb_0/copy10", copied[0]), ("emb_0/copy100", copied[1])] and n_flagged == [(2,)]
    manifest = pl.read_parquet(wh.parent / "warehouse_files" / "filtered_dataset.parquet")
    assert manifest.height == 570 and {"image_id", "caption", "weight"} <= set(manifest.columns)
    assert sorted(p.name for p in (wh.parent / "warehouse_files" / "embeddings").iterdir()) == [
        "emb_0.parquet", "emb_1.parquet"]


def test_run_with_own_embeddings_names_the_bad_file(tmp_path: Path) -> None:
    from dedup_assets.synth.clip_layout import laion_metadata, write_clip_pair

    root = tmp_path / "emb"
    write_clip_pair(root, 0, np.ones((4, 8), np.float32), laion_metadata(5, 0))
    proc = subprocess.run(
        _cli() + ["run", "--embeddings", str(root), "--threshold", "0.9", "--warehouse", str(tmp_path / "w.duckdb"),
                  "--dagster-home", str(tmp_path / "home")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "img_emb_0.npy has 4 rows but" in proc.stdout and "metadata_0.parquet has 5" in proc.stdout


def test_one_settings_object_for_cli_and_ui(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Precedence flag > environment > settings file > default; the definitions read the same file."""
    from dedup_assets.cli import build_parser
    from dedup_assets.definitions import build_definitions
    from dedup_assets.settings import Settings, read_settings_file, settings_file, write_settings_file

    for k in list(os.environ):
        if k.startswith("DEDUP_ASSETS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert settings_file() == tmp_path / "dedup_assets.env"  # without DEDUP_ASSETS_SETTINGS: in DAGSTER_HOME
    demo = Settings(source=str(tmp_path / "src"), warehouse=str(tmp_path / "w.duckdb"),
                    generated=str(tmp_path / "gen"), min_side=128)
    write_settings_file(demo)
    assert read_settings_file()["DEDUP_ASSETS_MIN_SIDE"] == "128"
    assert Settings.from_env() == demo  # what `dagster dev` builds its resources from
    res = build_definitions().resources
    assert res["prefilters"].min_side == 128 and res["dataset"].generated == str(tmp_path / "gen")
    args = build_parser().parse_args(["run"])
    assert args.min_side == 128 and args.embedder == "offline"
    monkeypatch.setenv("DEDUP_ASSETS_EMBEDDER", "openclip")  # the environment overrides the file
    monkeypatch.setenv("DEDUP_ASSETS_MIN_SIDE", "300")
    args = build_parser().parse_args(["run"])
    assert args.embedder == "openclip" and args.min_side == 300
    assert build_parser().parse_args(["run", "--min-side", "50"]).min_side == 50  # the flag overrides both
    (tmp_path / "dedup_assets.env").write_text("NOT_A_SETTING=1\n")
    try:
        Settings.from_env()
    except ValueError as e:
        assert "dedup_assets.env:1" in str(e)
    else:
        raise AssertionError("a bad settings line must be refused")
