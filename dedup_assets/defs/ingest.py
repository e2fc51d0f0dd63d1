"""Ingest stage: shard discovery (sensor + schedule) and the per-shard `image_index` asset."""


import json
import os
import time

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetSelection,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    asset_check,
    define_asset_job,
    job,
    op,
    sensor,
)

from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.partitions import (
    SHARDS_PARTITIONS_NAME,
    per_shard_asset,
    register_shards_on,
    shards_partitions,
    unregistered_shards,
)
from dedup_assets.defs.resources import DatasetResource, WarehouseResource
from dedup_assets.ingest.clip_retrieval import EmbeddingsInputError, discover_parts, validate_parts
from dedup_assets.ingest.clip_retrieval import index_frame as clip_index_frame
from dedup_assets.ingest.index import index_shard, skipped_frame, summarize_index
from dedup_assets.ingest.shards import RejectedShard, Skipped, discover_shards, escape, find_shard
from dedup_assets.tables import write_image_index, write_skipped_entries
from dedup_assets.warehouse import Warehouse

GROUP = "ingest"


@per_shard_asset(
    "image_index",
    GROUP,
    kinds={"duckdb", "python"},
    description=(
        "One row per file found in the shard, including files that fail to decode: image_id "
        "(`<shard>/<key>`), location, caption, url, sha256, format, size after EXIF orientation, "
        "and status ('ok' or a machine-readable reason)."
    ),
)
def image_index(
    context: AssetExecutionContext, dataset: DatasetResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    started = time.perf_counter()
    per_shard: dict[str, dict] = {}
    rejected: dict[str, int] = {}
    frames = []
    # A backfill may hand this run several shards (BackfillPolicy below); each is its own transaction.
    if dataset.is_external:
        return _index_external(context, dataset, wh)
    skipped_by_reason: dict[str, int] = {}
    for shard_name in context.partition_keys:
        shard = find_shard(dataset.root, shard_name, dataset.follow_links)
        t0 = time.perf_counter()

        def progress(n: int, elapsed: float, name: str = shard.name) -> None:
            context.log.info(f"[{name}] indexed {n} files ({n / max(elapsed, 1e-9):.1f} files/s)")

        skipped: list[Skipped] = []
        df = index_shard(
            shard, limits=dataset.limits, workers=dataset.index_workers, progress=progress,
            read_limits=dataset.read_limits, skipped=skipped,
        )
        write_image_index(wh, shard.name, df)
        write_skipped_entries(wh, shard.name, skipped_frame(shard.name, skipped))
        summary = summarize_index(df)
        skip_counts = _counts(s.reason for s in skipped)
        for reason, n in skip_counts.items():
            skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + n
        for reason, n in summary.get("rejected_by_reason", {}).items():
            rejected[reason] = rejected.get(reason, 0) + int(n)
        per_shard[shard.name] = {"rows": df.height, "ok": int(summary.get("ok", 0)), "kind": shard.kind,
                                 "bytes": int(summary.get("total_bytes", 0)), "skipped": len(skipped)}
        context.log.info(
            f"[{shard.name}] {df.height} rows ({per_shard[shard.name]['ok']} ok, "
            f"{df.height - per_shard[shard.name]['ok']} with a reason: {_fmt_counts(summary.get('rejected_by_reason', {}))}); "
            f"{len(skipped)} entries skipped ({_fmt_counts(skip_counts)}) in {time.perf_counter() - t0:.2f}s"
        )
        frames.append(df)
    seconds = time.perf_counter() - started
    rows = sum(v["rows"] for v in per_shard.values())
    preview = frames[-1] if frames else None
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "ok": sum(v["ok"] for v in per_shard.values()),
            "rejected": sum(rejected.values()),
            "rejected_by_reason": counts_table(rejected),
            "skipped_entries": sum(skipped_by_reason.values()),
            "skipped_by_reason": counts_table(skipped_by_reason),
            "bytes": sum(v["bytes"] for v in per_shard.values()),
            "seconds": round(seconds, 3),
            "files_per_second": round(rows / max(seconds, 1e-9), 1),
            "shards": MetadataValue.json(per_shard),
            "preview": table_preview(
                preview.select("image_id", "status", "format", "width", "height", "caption")
            ) if preview is not None else MetadataValue.md("_(no shard)_"),
        }
    )


def _index_external(context: AssetExecutionContext, dataset: DatasetResource, wh) -> MaterializeResult:  # noqa: ANN001
    """image_index of clip-retrieval file pairs: one row per metadata row, bad vectors recorded."""
    started = time.perf_counter()
    parts = {p.partition: p for p in discover_parts(dataset.root)}
    validate_parts(list(parts.values()))  # headers only: row counts per pair, one dimension for all files
    per_part: dict[str, dict] = {}
    last = None
    for key in context.partition_keys:
        if key not in parts:
            raise EmbeddingsInputError(f"no file pair for partition {key!r} under {dataset.root}")
        part = parts[key]
        t0 = time.perf_counter()
        df, stats = clip_index_frame(part, batch_rows=dataset.batch_rows)
        write_image_index(wh, key, df)
        per_part[key] = {**vars(stats), "npy": str(part.npy), "metadata": str(part.metadata)}
        context.log.info(
            f"[{key}] {stats.rows} rows ({stats.ok} ok, {stats.non_finite} NaN/Inf, {stats.zero_vector} zero, "
            f"{stats.duplicate_key} repeated keys; {stats.renormalized} not unit-norm) in {time.perf_counter() - t0:.2f}s"
        )
        last = df
    seconds = time.perf_counter() - started
    rows = sum(v["rows"] for v in per_part.values())
    rejected = {
        reason: sum(v[field] for v in per_part.values())
        for reason, field in (("bad_embedding:non_finite", "non_finite"), ("bad_embedding:zero_vector", "zero_vector"),
                              ("duplicate_key", "duplicate_key"))
    }
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "source": MetadataValue.text(f"external embeddings (clip-retrieval layout) under {dataset.root}"),
            "ok": sum(v["ok"] for v in per_part.values()),
            "rejected": sum(rejected.values()),
            "rejected_by_reason": counts_table({k: v for k, v in rejected.items() if v}),
            "not_unit_norm_renormalized": sum(v["renormalized"] for v in per_part.values()),
            "seconds": round(seconds, 3),
            "rows_per_second": round(rows / max(seconds, 1e-9), 1),
            "partitions": MetadataValue.json(per_part),
            "preview": table_preview(last.select("image_id", "status", "error", "caption", "url"))
            if last is not None else MetadataValue.md("_(no partition)_"),
        }
    )


@asset_check(asset=image_index, description="image_id is unique within the shard's rows.")
def image_index_ids_unique(context, warehouse: WarehouseResource) -> AssetCheckResult:
    dupes = warehouse.get().query(
        "SELECT image_id, count(*) AS n FROM image_index GROUP BY image_id HAVING count(*) > 1 LIMIT 20"
    )
    return AssetCheckResult(
        passed=dupes.height == 0,
        metadata={"duplicated_ids": MetadataValue.json(dupes["image_id"].to_list())},
    )


def _counts(reasons) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


ROOT_PARTITION = ""  # skipped_entries rows for entries directly under the dataset root


def record_root_skips(wh: Warehouse, root, rejected: list[RejectedShard]) -> str:  # noqa: ANN001
    """Write the root's non-shard entries to `skipped_entries` (shard '') and return a one-line
    summary with counts by reason and a few examples."""
    items = [Skipped(escape(os.fsencode(r.path.name)), r.code, r.reason.split(": ", 1)[-1]) for r in rejected]
    write_skipped_entries(wh, ROOT_PARTITION, skipped_frame(ROOT_PARTITION, items))
    if not items:
        return f"every entry under {root} is a shard"
    examples = ", ".join(f"{s.entry} ({s.reason})" for s in items[:3])
    return (f"{len(items)} entries under {root} are not shards ({_fmt_counts(_counts(s.reason for s in items))}), "
            f"e.g. {examples}; all listed in skipped_entries (shard '')")


# ------------------------------------------------------------------------------------- discovery
PER_SHARD_ASSETS = AssetSelection.assets("image_index", "prefilter", "embeddings")
shard_job = define_asset_job(
    "shard_job",
    selection=PER_SHARD_ASSETS,
    partitions_def=shards_partitions,
    description="Index, pre-filter and embed one shard.",
)


def new_shards(dataset: DatasetResource, known: set[str]) -> tuple[list[str], list[str]]:
    """Partition keys on disk not in `known` (shards, or emb_{i} file pairs of external embeddings),
    and the rejected paths with their reasons."""
    if not dataset.root.exists():
        return [], [f"{dataset.root}: dataset root does not exist"]
    if dataset.is_external:
        try:
            parts = discover_parts(dataset.root)
        except EmbeddingsInputError as e:
            return [], [str(e)]
        return [p.partition for p in parts if p.partition not in known], []
    shards, rejected = discover_shards(dataset.root, dataset.follow_links)
    return (
        [s.name for s in shards if s.name not in known],
        [f"{escape(os.fsencode(r.path))}: {r.reason}" for r in rejected if r.code != "not_a_shard"],
    )


@sensor(
    job=shard_job,
    minimum_interval_seconds=60,
    description=(
        "Discovers shards that are new under the dataset root, adds one dynamic partition per "
        "shard, and requests a run that indexes, pre-filters and embeds it."
    ),
)
def shard_sensor(context: SensorEvaluationContext, dataset: DatasetResource) -> SensorResult:
    requested: set[str] = set(json.loads(context.cursor)) if context.cursor else set()
    fresh, rejected = new_shards(dataset, requested)
    for line in rejected:
        context.log.warning(f"skipping shard {line}")
    to_add = unregistered_shards(context.instance, fresh)
    return SensorResult(
        run_requests=[RunRequest(run_key=f"shard:{s}", partition_key=s) for s in fresh],
        dynamic_partitions_requests=[shards_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps(sorted(requested | set(fresh))),
    )


@op(description="Registers every valid shard under the dataset root as a partition; records the rest.")
def register_shards(
    context: OpExecutionContext, dataset: DatasetResource, warehouse: WarehouseResource
) -> list[str]:
    registered = set(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    fresh, rejected = new_shards(dataset, registered)
    for line in rejected:
        context.log.warning(f"skipping shard {line}")
    if dataset.root.exists() and not dataset.is_external:
        context.log.info(record_root_skips(warehouse.get(), dataset.root, discover_shards(dataset.root, dataset.follow_links)[1]))
    fresh = register_shards_on(context.instance, fresh)
    context.log.info(f"registered {len(fresh)} new shard(s): {fresh[:20]}")
    return fresh


@job(description="Discover shards and register them as partitions (the sensor then runs them).")
def discover_shards_job() -> None:
    register_shards()


def discovery_schedule(cron: str) -> ScheduleDefinition:
    """Re-runs discovery on a cron (DEDUP_ASSETS_DISCOVERY_CRON), so shards are registered even
    while the sensor is off."""
    return ScheduleDefinition(
        name="discovery_schedule",
        job=discover_shards_job,
        cron_schedule=cron,
        description=f"Registers new shards as partitions on the cron '{cron}'.",
    )
