"""`dedup-assets`: drive the same Definitions headlessly, in a persistent Dagster instance.

    dedup-assets run --source DIR [--warehouse FILE] [--generated DIR]
                     [--embedder offline|openclip] [--model NAME] [--pretrained TAG|PATH]
                     [--device auto|cuda|cpu] [--min-side N] [--dagster-home DIR] [--refit] [--force]
                     [--threshold T]
    dedup-assets run --embeddings DIR --threshold T [--model-id NAME] [--generated-embeddings DIR] …
    dedup-assets sample --out DIR [--generated-out DIR]
    dedup-assets demo        # writes the sample dataset under data/ and runs everything on it
    dedup-assets dev [--port N]  # the Dagster UI (dagster dev -w workspace.yaml) and the review pages
    dedup-assets label --set NAME [--positive ID ...] [--negative ID ...] [--from FILE]  # classifier labels

`run` registers every shard under --source as a dynamic partition, materializes the per-shard
assets one shard at a time and then the corpus assets, all through Dagster (the runs show in the
UI when it uses the same DAGSTER_HOME), prints progress and a summary, and exits non-zero with a
clear message on failure. A re-run resumes: a shard whose files did not change since its last
successful per-shard run (same fingerprint and settings, table `shard_state`) is skipped; `--force`
redoes it. Runs left behind by a killed `dedup-assets` process are marked failed and their pool
slots freed before anything starts (`dedup_assets.instance`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_DAGSTER_YAML = """\
# Written by dedup-assets for a DAGSTER_HOME it created; see the repository's dagster.yaml.
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


# The terminal shows the assets' own progress lines (INFO), not Dagster's per-step DEBUG events;
# the full event log is in the UI.
QUIET = {"console": {"config": {"log_level": "INFO"}}}


def _dagster_home(explicit: str | None, warehouse: Path) -> Path:
    """DAGSTER_HOME to use: --dagster-home, $DAGSTER_HOME, the cwd if it has dagster.yaml
    (the repository root), else a folder next to the warehouse."""
    if explicit:
        home = Path(explicit)
    elif os.environ.get("DAGSTER_HOME"):
        home = Path(os.environ["DAGSTER_HOME"])
    elif Path("dagster.yaml").exists():
        home = Path.cwd()
    else:
        home = warehouse.parent / "dagster_home"
    home = home.resolve()
    from dedup_assets.instance import instance_lock

    with instance_lock(home):  # two processes starting on a new home write it once
        if not (home / "dagster.yaml").exists():
            (home / "dagster.yaml").write_text(DEFAULT_DAGSTER_YAML)
    return home


def _print(msg: str) -> None:
    print(msg, flush=True)


def _external_partitions(args: argparse.Namespace) -> list[str] | str:
    """Partition keys of --embeddings DIR (and a check of --generated-embeddings), or an error line."""
    from dedup_assets.ingest.clip_retrieval import EmbeddingsInputError, discover_parts, validate_parts

    try:
        parts = discover_parts(args.embeddings)
        dim = validate_parts(parts)
        if getattr(args, "generated_embeddings", None):
            gen_dim = validate_parts(discover_parts(args.generated_embeddings))
            if gen_dim != dim:
                return (f"--generated-embeddings {args.generated_embeddings} holds {gen_dim}-d vectors but "
                        f"--embeddings {args.embeddings} holds {dim}-d: they must come from one model")
    except EmbeddingsInputError as e:
        return str(e)
    return [p.partition for p in parts]


def cmd_run(args: argparse.Namespace) -> int:
    from dedup_assets.settings import ENV_EMBEDDINGS, ENV_SOURCE, OPTIONAL_ENV, Settings, configured, write_settings_file

    if not getattr(args, "source", None) and not getattr(args, "embeddings", None):
        # neither flag: the configured source (environment, then the settings file)
        args.embeddings = configured(ENV_EMBEDDINGS)
        args.source = None if args.embeddings else configured(ENV_SOURCE)
    external = bool(getattr(args, "embeddings", None))  # bring-your-own embeddings instead of shards
    if not external and not args.generated:  # the configured generated folder goes with image shards only
        from dedup_assets.settings import ENV_GENERATED

        args.generated = configured(ENV_GENERATED)
    if not external and not args.source:
        _print("error: give --source DIR (shards of images) or --embeddings DIR (clip-retrieval vectors)")
        return 2
    source = Path(args.embeddings if external else args.source)
    if not source.is_dir():
        if external:
            _print(f"error: --embeddings {source} is not a directory (it must hold img_emb/ and metadata/)")
            return 2
        _print(f"error: --source {source} is not a directory (it must hold one folder or .tar per shard)")
        return 2
    if args.generated and not Path(args.generated).is_dir():
        _print(f"error: --generated {args.generated} is not a directory")
        return 2
    try:
        settings = Settings(
            source=str(source.resolve()),
            warehouse=str(Path(args.warehouse).resolve()),
            generated=str(Path(args.generated).resolve()) if args.generated else None,
            embedder=args.embedder,
            model=args.model,
            pretrained=args.pretrained,
            device=args.device,
            min_side=args.min_side,
            embeddings=str(source.resolve()) if external else None,
            model_id=getattr(args, "model_id", None) or "external",
            threshold=getattr(args, "threshold", None),
            generated_embeddings=str(Path(args.generated_embeddings).resolve())
            if getattr(args, "generated_embeddings", None) else None,
            report_base_url=getattr(args, "report_base_url", None),
            min_clip_score=getattr(args, "min_clip_score", None),
        )
    except ValueError as e:
        _print(f"error: {e}")
        return 2
    home = _dagster_home(args.dagster_home, Path(settings.warehouse))
    os.environ["DAGSTER_HOME"] = str(home)
    written = write_settings_file(settings)  # the UI (dagster dev) and later runs see this run's settings
    _print(f"settings written to {written} (read by `dagster dev` and by later runs; flags and env override)")
    for name in OPTIONAL_ENV:  # a setting this run leaves unset must not leak in from the environment
        os.environ.pop(name, None)
    os.environ.update(settings.to_env())

    from dagster import Definitions

    from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources, classifier_job, corpus_job
    from dedup_assets.defs.ingest import record_root_skips, shard_job
    from dedup_assets.defs.partitions import register_shards_on
    from dedup_assets.ingest.shards import discover_shards, escape
    from dedup_assets.instance import PROCESS_TAG, ShardState, open_instance, process_tag, recover_stale_runs
    from dedup_assets.warehouse import Warehouse

    rejected = []

    if external:
        found = _external_partitions(args)
        if isinstance(found, str):
            _print(f"error: {found}")
            return 2
        keys = found
    else:
        shards, rejected = discover_shards(source)
        for r in rejected:
            if r.code not in ("hidden", "not_a_shard"):
                _print(f"skipping {escape(os.fsencode(r.path))}: {r.reason}")
        if not shards:
            _print(f"error: no shards under {source} (expected <shard>/ folders or <shard>.tar files)")
            return 2
        keys = [s.name for s in shards]
    by_key = {} if external else {s.name: s for s in shards}

    instance = open_instance(home)
    recovered = recover_stale_runs(instance)
    if recovered:
        _print(
            f"recovered {len(recovered)} run(s) left by a dedup-assets process that is gone "
            f"({', '.join(r[:8] for r in recovered)}): marked failed, their pool slots freed"
        )
    new = register_shards_on(instance, keys)
    _print(
        f"dedup-assets: {len(keys)} {'file pair(s)' if external else 'shard(s)'} under {source} "
        f"({len(new)} newly registered); warehouse {settings.warehouse}; "
        f"embedder {'external: ' + settings.model_id if external else settings.embedder}; DAGSTER_HOME {home}"
    )

    resources = build_resources(settings)
    if external:  # τ must be known before any work: external vectors have no calibrated value
        from dedup_assets.tables import resolve_threshold

        try:
            resolve_threshold(None, resources["embedder"])
        except ValueError as e:
            _print(f"error: {e}")
            return 2
    if settings.embedder == "openclip":
        # Fail before any run starts when the weights cannot be had (no silent fallback).
        from dedup_assets.embed.openclip import ModelUnavailableError

        try:
            resources["embedder"].build()
        except ModelUnavailableError as e:
            _print(f"error: {e}")
            return 2
    # One command re-embeds every shard, so vectors of a previous embedder are replaced, not mixed.
    resources["embedder"] = resources["embedder"].model_copy(update={"on_model_change": "reset"})
    wh = Warehouse(settings.warehouse)
    if not external:
        _print(record_root_skips(wh, source, rejected))
    tags = {"dedup-assets/cli": "run", PROCESS_TAG: process_tag()}
    state = ShardState(wh)
    recorded = {} if getattr(args, "force", False) else state.recorded()
    config = _per_shard_config(resources)
    # the named jobs, so that the runs list says what ran (not __ephemeral_asset_job__)
    jobs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=[shard_job, classifier_job, corpus_job],
                       resources=resources)
    failures: list[str] = []
    shard_check_failures: list[str] = []
    started = time.perf_counter()
    total_images = 0
    resumed = 0
    kind = "partition" if external else "shard"
    for n, key in enumerate(keys, 1):
        t0 = time.perf_counter()
        fingerprint = _fingerprint(source, key, by_key.get(key))
        if recorded.get(key) == (fingerprint, config):
            resumed += 1
            _print(f"[{n}/{len(keys)}] {kind} {key}: unchanged since its last successful run, skipped (--force redoes it)")
            continue
        state.forget(key)
        result = jobs.resolve_job_def("shard_job").execute_in_process(
            partition_key=key,
            run_config={"loggers": QUIET},
            resources=resources,
            instance=instance,
            raise_on_error=False,
            tags=tags,
        )
        dt = time.perf_counter() - t0
        if result.success:
            state.record(key, fingerprint, config, result.run_id)
        rows = wh.query("SELECT count(*) AS n FROM image_index WHERE shard = $s", {"s": key})["n"][0] \
            if wh.table_exists("image_index") else 0
        total_images += int(rows)
        status = "ok" if result.success else "FAILED"
        skipped = wh.query("SELECT count(*) AS n FROM skipped_entries WHERE shard = $s", {"s": key})["n"][0] \
            if wh.table_exists("skipped_entries") else 0
        _print(
            f"[{n}/{len(keys)}] {kind} {key}: {rows} {'rows' if external else 'files'}"
            + (f" (+{skipped} entries skipped, see skipped_entries)" if skipped else "")
            + f" in {dt:.1f}s ({rows / max(dt, 1e-9):.1f} images/s) {status}  run {result.run_id[:8]}"
        )
        if not result.success:
            failures.extend(_failed_steps(result))
        for name, passed in _check_results(result):
            if not passed:
                shard_check_failures.append(f"{name} (shard {key})")
    _print(
        f"per-shard stage: {total_images} files in {time.perf_counter() - started:.1f}s"
        + (f"; {resumed} unchanged {kind}(s) skipped" if resumed else "")
    )

    from dedup_assets.defs.partitions import register_label_sets_on
    from dedup_assets.tables import label_set_names

    label_sets = label_set_names(wh)  # each set's filter classifier, retrained on this run's vectors
    register_label_sets_on(instance, label_sets)
    for name in label_sets:
        t0 = time.perf_counter()
        result = jobs.resolve_job_def("classifier_job").execute_in_process(
            partition_key=name, run_config={"loggers": QUIET}, resources=resources, instance=instance,
            raise_on_error=False, tags=tags,
        )
        _print(f"label set {name}: classifier {'ok' if result.success else 'FAILED'} in "
               f"{time.perf_counter() - t0:.1f}s  run {result.run_id[:8]}")
        if not result.success:
            failures.extend(_failed_steps(result))

    t0 = time.perf_counter()
    result = jobs.resolve_job_def("corpus_job").execute_in_process(
        run_config={
            "ops": {"clusterings": {"config": {"refit": bool(getattr(args, "refit", False))}}},
            "loggers": QUIET,
        },
        resources=resources,
        instance=instance,
        raise_on_error=False,
        tags=tags,
    )
    _print(f"corpus stage: {'ok' if result.success else 'FAILED'} in {time.perf_counter() - t0:.1f}s  run {result.run_id[:8]}")
    if not result.success:
        failures.extend(_failed_steps(result))
    _print_summary(wh, result, shard_check_failures, demo=getattr(args, "demo", False))
    if failures:
        _print("\nFAILED steps:\n  " + "\n  ".join(failures))
        return 1
    _print(
        f"\nOpen the UI:  DAGSTER_HOME={home} dedup-assets dev   (or `make dev`: the UI and the review pages)\n"
        f"Query:        duckdb {settings.warehouse} \"SELECT * FROM filtered_dataset LIMIT 5\""
    )
    return 0


def _fingerprint(source: Path, key: str, shard) -> str:  # noqa: ANN001 - Shard | None
    """The resume fingerprint of a shard, or of an external partition's npy + parquet pair."""
    from dedup_assets.ingest.shards import shard_fingerprint

    if shard is not None:
        return shard_fingerprint(shard)
    from dedup_assets.ingest.clip_retrieval import find_part
    from dedup_assets.instance import config_digest

    part = find_part(source, key)
    return config_digest({str(p): (st.st_size, st.st_mtime_ns, st.st_ino)
                          for p in (part.npy, part.metadata) for st in [os.stat(p)]})


def _per_shard_config(resources: dict) -> str:
    """Digest of the settings that change what the per-shard assets write (resume key)."""
    from dedup_assets.instance import config_digest

    return config_digest({
        "dataset": resources["dataset"].model_dump(exclude={"generated", "generated_embeddings"}),
        "prefilters": resources["prefilters"].model_dump(),
        "embedder": resources["embedder"].model_dump(exclude={"on_model_change"}),
    })


def _failed_steps(result) -> list[str]:  # noqa: ANN001
    """One line per failed step; a failed run with no failed step (e.g. a resource that could not
    start) still gives a line, so the exit code says it failed."""
    out = _step_failures(result)
    if not out and not result.success:
        msgs = [ev.message for ev in result.all_events if ev.event_type_value in ("RUN_FAILURE", "PIPELINE_FAILURE")]
        out.append(f"run {result.run_id[:8]}: {(msgs[-1] if msgs and msgs[-1] else 'failed before any step ran').strip().splitlines()[-1]}")
    return out


def _step_failures(result) -> list[str]:  # noqa: ANN001
    out = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            while err is not None and err.cause is not None:  # the user's exception, not Dagster's wrapper
                err = err.cause
            msg = err.message.strip().splitlines()[-1] if err else "unknown error"
            out.append(f"{ev.step_key}: {msg}")
    return out


def _print_summary(wh, result, shard_check_failures: list[str], demo: bool = False) -> None:  # noqa: ANN001
    def count(table: str, where: str = "") -> int | str:
        if not wh.table_exists(table):
            return "-"
        return int(wh.query(f"SELECT count(*) AS n FROM {table} {where}")["n"][0])

    _print("\nSummary")
    for label, table, where in [
        ("indexed files", "image_index", ""),
        ("decoded ok", "image_index", "WHERE status = 'ok'"),
        ("passed pre-filters", "prefilter", "WHERE passed"),
        ("embedded", "embeddings", ""),
        ("candidate pairs", "candidate_pairs", ""),
        ("verified duplicate pairs", "verified_pairs", "WHERE is_duplicate"),
        ("images in duplicate groups", "duplicate_groups", ""),
        ("duplicate groups", "duplicate_groups", "WHERE is_keeper"),
        ("kept (filtered_dataset)", "filtered_dataset", ""),
        ("removed", "removed_images", ""),
        ("audited generated images", "regurgitation_audit", "WHERE rank = 1"),
        ("flagged near-copies", "regurgitation_audit", "WHERE flagged AND rank = 1"),
    ]:
        _print(f"  {label:<28} {count(table, where)}")
    for name, passed in _check_results(result):
        note = ""
        if not passed and name == "no_regurgitation":
            note = "  (near-copies of training images: see regurgitation_audit.html)"
            if demo:
                note += "\n        expected in the demo: its generated folder holds planted copies of training images"
        _print(f"  check {name:<22} {'passed' if passed else 'FAILED'}{note}")
    for line in shard_check_failures:
        _print(f"  check {line} FAILED")


def _check_results(result) -> list[tuple[str, bool]]:  # noqa: ANN001
    return [
        (ev.event_specific_data.check_name, bool(ev.event_specific_data.passed))
        for ev in result.all_events
        if ev.event_type_value == "ASSET_CHECK_EVALUATION"
    ]


def cmd_sample(args: argparse.Namespace) -> int:
    from dedup_assets.synth.datasets import sample_dataset

    info = sample_dataset(Path(args.out), Path(args.generated_out) if args.generated_out else None).counts()
    _print(f"wrote sample dataset: {info}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dedup_assets.synth.datasets import sample_dataset

    data = Path(args.data)
    info = sample_dataset(data / "sample", data / "generated").counts()
    _print(f"sample dataset: {info}")
    ns = argparse.Namespace(
        source=str(data / "sample"),
        warehouse=str(data / "warehouse.duckdb"),
        generated=str(data / "generated"),
        embedder="offline",
        model="ViT-B-32",
        pretrained=None,
        device="auto",
        min_side=args.min_side,
        dagster_home=args.dagster_home,
        refit=False,
        force=False,
        report_base_url=args.report_base_url,
        demo=True,
    )
    _print(f"(demo uses min side {args.min_side} px instead of the Conceptual Captions 400 px: the sample images are small)")
    return cmd_run(ns)


def cmd_label(args: argparse.Namespace) -> int:
    """Add labels of one label set to the warehouse (table `labels`) for the filter classifiers."""
    from datetime import datetime, timezone

    import polars as pl

    from dedup_assets import tables
    from dedup_assets.filters.label_page import read_labels_file
    from dedup_assets.warehouse import Warehouse

    from dedup_assets.defs.partitions import check_label_set_name

    try:
        check_label_set_name(args.label_set)
    except ValueError as e:
        _print(f"error: --set: {e}")
        return 2
    rows = [(i, True) for i in args.positive] + [(i, False) for i in args.negative]
    if args.from_file:
        rows += read_labels_file(Path(args.from_file))
    if not rows:
        _print("error: give --positive IDS, --negative IDS or --from FILE")
        return 2
    if args.warehouse is None:
        from dedup_assets.settings import Settings

        args.warehouse = Settings.from_env().warehouse
    wh = Warehouse(args.warehouse)
    ids = sorted({i for i, _ in rows})
    known = set(wh.read_table("image_index", columns=["image_id"], where="list_contains($ids, image_id)",
                              params={"ids": ids})["image_id"].to_list()) if wh.table_exists("image_index") else set()
    unknown = [i for i in ids if i not in known]
    if unknown:
        _print(f"error: {len(unknown)} image id(s) not in image_index, e.g. {unknown[:5]}; nothing written")
        return 2
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    n = tables.write_labels(wh, pl.DataFrame({
        "image_id": [i for i, _ in rows], "label_set": [args.label_set] * len(rows), "label": [v for _, v in rows],
        "source": [args.source] * len(rows), "labelled_at": [now] * len(rows)}))
    labels = tables.read_labels(wh, args.label_set)
    from dedup_assets.defs.partitions import register_label_sets_on
    from dedup_assets.instance import open_instance

    home = _dagster_home(args.dagster_home, Path(args.warehouse).resolve())
    instance = open_instance(home)
    try:
        added = register_label_sets_on(instance, [args.label_set])
    finally:
        instance.dispose()
    _print(f"label set {args.label_set}: {n} labels written; {int(labels['label'].sum())} positive, "
           f"{int((~labels['label']).sum())} negative in all"
           + (f"; partition {args.label_set!r} of label_sets added in {home}" if added else "")
           + f" — materialize filter_classifiers[{args.label_set}] to retrain (`dedup-assets run` does, and so does "
           "the label sensor when it is on)")
    return 0


REPORTS_URL = "http://127.0.0.1:3001"  # where `dedup-assets dev` serves the warehouse's _files folder


def _serve_reports(directory: Path, base_url: str):  # noqa: ANN202
    """Serve `directory` read-only on the loopback port of `base_url`, in a daemon thread."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    url = urlparse(base_url)
    if url.hostname not in ("127.0.0.1", "localhost") or not url.port or url.path not in ("", "/"):
        return None  # served elsewhere (a web server or bucket the user runs): nothing to start here

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

        def do_PUT(self) -> None:  # read-only
            self.send_error(405)

    try:
        server = ThreadingHTTPServer(("127.0.0.1", url.port), functools.partial(Quiet, directory=str(directory)))
    except OSError as e:
        raise ValueError(f"cannot serve the review pages on {base_url} ({e}); pass --port N or set "
                         "DEDUP_ASSETS_REPORT_BASE_URL to a free loopback port") from e
    threading.Thread(target=server.serve_forever, daemon=True, name="review-pages").start()
    return server


def cmd_dev(args: argparse.Namespace) -> int:
    """`dagster dev -w workspace.yaml` with the settings file's configuration, plus a loopback web server
    for the review pages, manifests and embedding files next to the warehouse, so the UI's links open."""
    import subprocess

    from dedup_assets.settings import ENV_REPORT_BASE_URL, Settings

    settings = Settings.from_env()
    base = settings.report_base_url or REPORTS_URL
    directory = Path(settings.warehouse).with_name(Path(settings.warehouse).stem + "_files")
    directory.mkdir(parents=True, exist_ok=True)
    if args.port:
        base = f"http://127.0.0.1:{args.port}"
    server = _serve_reports(directory, base)
    if server is not None:
        _print(f"review pages: {base}/ serves {directory}")
    env = dict(os.environ)
    env[ENV_REPORT_BASE_URL] = base  # runs launched from the UI record links under it
    # `dagster dev` prints a SupersessionWarning pointing at `dg dev`; `dg` needs the dagster-dg-cli
    # package and a dg project layout, while this repository is loaded from workspace.yaml, which
    # `dagster dev` supports. So the warning is silenced here, and only here.
    # (A -W category filter cannot name dagster's class: it is resolved before dagster is importable.)
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), "ignore:Function `dev_command` is superseded"]))
    dagster = Path(sys.executable).with_name("dagster")
    # the repository's workspace.yaml when run from a checkout, else the installed module
    where = ["-w", args.workspace] if Path(args.workspace).is_file() else ["-m", "dedup_assets.definitions"]
    cmd = [str(dagster) if dagster.exists() else "dagster", "dev", *where, *[a for a in args.dagster_args if a != "--"]]
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if server is not None:
            server.shutdown()


def build_parser() -> argparse.ArgumentParser:
    from dedup_assets.settings import Settings

    try:  # every default comes from one settings object: environment over the settings file
        d = Settings.from_env()
    except ValueError as e:
        _print(f"warning: ignoring the settings file and environment: {e}")
        d = Settings()

    p = argparse.ArgumentParser(prog="dedup-assets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="index, filter, embed, dedup, reweight and audit a dataset")
    r.add_argument("--source", default=None,
                   help="dataset root with one folder or .tar per shard (default: DEDUP_ASSETS_SOURCE or the settings file)")
    r.add_argument("--embeddings", default=None, metavar="DIR",
                   help="bring your own embeddings instead of --source: clip-retrieval layout "
                        "img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet (needs --threshold)")
    r.add_argument("--model-id", default=d.model_id,
                   help="model id recorded with --embeddings vectors (default 'external')")
    r.add_argument("--threshold", type=float, default=d.threshold,
                   help="near-copy cosine τ of dedup and audit (any embedder; required with --embeddings)")
    r.add_argument("--generated-embeddings", default=None, metavar="DIR",
                   help="vectors of generated images (same layout as --embeddings) to audit instead of --generated")
    r.add_argument("--warehouse", default=d.warehouse)
    r.add_argument("--generated", default=None,
                   help="folder of model-generated images to audit")
    r.add_argument("--embedder", choices=["offline", "openclip"], default=d.embedder)
    r.add_argument("--model", default=d.model, help="open_clip model name")
    r.add_argument("--pretrained", default=d.pretrained, help="open_clip pretrained tag or local checkpoint path")
    r.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device)
    r.add_argument("--min-side", type=int, default=d.min_side,
                   help=f"pre-filter minimum side in px (default {d.min_side}: DEDUP_ASSETS_MIN_SIDE, the settings file, or 400)")
    r.add_argument("--dagster-home", default=None)
    r.add_argument("--force", action="store_true",
                   help="redo every shard, also those unchanged since their last successful run")
    r.add_argument("--report-base-url", default=d.report_base_url, metavar="URL",
                   help="URL at which the warehouse's _files folder is served: review pages become links in the UI "
                        "(default: DEDUP_ASSETS_REPORT_BASE_URL or the settings file)")
    r.add_argument("--min-clip-score", type=float, default=d.min_clip_score, metavar="T",
                   help="remove images whose cosine with their caption is below T (open_clip's text tower; "
                        "LAION used 0.28 for ViT-B-32); needs --embedder openclip")
    r.add_argument("--refit", action="store_true",
                   help="refit the k-means clusterings instead of assigning new images to the stored centroids")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sample", help="write the synthetic sample dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--generated-out", default=None)
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="write the sample dataset under data/ and run everything on it")
    d.add_argument("--data", default="data")
    d.add_argument("--min-side", type=int, default=128)
    d.add_argument("--dagster-home", default=None)
    d.add_argument("--report-base-url", default=REPORTS_URL, metavar="URL",
                   help=f"where `dedup-assets dev` serves the review pages (default {REPORTS_URL})")
    d.set_defaults(func=cmd_demo)

    lab = sub.add_parser("label", help="add labels of a label set for the filter classifiers (filter_classifiers)")
    lab.add_argument("--set", required=True, dest="label_set", help="label set name, e.g. violence")
    lab.add_argument("--positive", nargs="*", default=[], metavar="IMAGE_ID", help="images to remove (image_id)")
    lab.add_argument("--negative", nargs="*", default=[], metavar="IMAGE_ID", help="images to keep (image_id)")
    lab.add_argument("--from", dest="from_file", metavar="FILE",
                     help="labels from a labelling page's download (JSON) or 'image_id<TAB>1|0' lines")
    lab.add_argument("--warehouse", default=None, help="DuckDB file (default: DEDUP_ASSETS_WAREHOUSE or the settings file)")
    lab.add_argument("--source", default="cli", help="who labelled (recorded with each label)")
    lab.add_argument("--dagster-home", default=None,
                     help="instance whose label_sets partitions get the set (default: as `run` picks it)")
    lab.set_defaults(func=cmd_label)

    v = sub.add_parser("dev", help="the Dagster UI on this configuration, with the review pages served")
    v.add_argument("--workspace", default="workspace.yaml",
                   help="workspace file (default ./workspace.yaml; without one the installed module is loaded)")
    v.add_argument("--port", type=int, default=None, help="port of the review pages (default: the settings' URL)")
    v.add_argument("dagster_args", nargs=argparse.REMAINDER, help="passed to `dagster dev` (e.g. -p 3000)")
    v.set_defaults(func=cmd_dev)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear one-line message, not a traceback, for expected failures
        from dedup_assets.embed.openclip import ModelUnavailableError

        if isinstance(e, (ModelUnavailableError, FileNotFoundError, ValueError)):
            _print(f"error: {e}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
