"""Filter stage: the per-shard `prefilter` asset (image, caption and content-safety filters)."""


import time

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    asset,
    sensor,
)
from PIL import Image
from pydantic import Field

from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.partitions import check_label_set_name, label_sets_partitions, per_shard_asset
from dedup_assets.defs.resources import WarehouseResource, config_from
from dedup_assets.filters.config import PrefilterConfig, check_dependencies
from dedup_assets.filters.run import has_image_data, run_prefilter, summarize_prefilter
from dedup_assets.ingest.decode import decode_rgb
from dedup_assets.ingest.shards import read_location
from dedup_assets.tables import column_schema, read_image_index, replace_caption_hypernyms

GROUP = "filters"


class PrefilterResource(ConfigurableResource):
    """Thresholds of the Conceptual-Captions-style filters; all of them appear in run metadata."""

    min_side: int = Field(default=400, description="Minimum width and height in pixels (CC: 400).")
    max_aspect_ratio: float = Field(default=2.0, description="Maximum long side / short side (CC: 2).")
    max_file_bytes: int | None = Field(default=None, description="Remove files larger than this, in bytes (None = no limit).")
    languages: list[str] | None = Field(
        default=["en"], description="Allowed caption languages (ISO 639-1); null disables the check."
    )
    profanity: bool = Field(default=True, description="Remove captions the profanity model scores above profanity_threshold.")
    nsfw: bool = Field(default=False, description="Run the offline NSFW detector (extra 'nsfw').")
    nsfw_threshold: float = Field(default=0.3, description="Lower removes more (biased toward removal).")
    hypernymize: bool = Field(
        default=False,
        description="Also write each caption with proper names replaced by hypernyms (person, city, country, state, "
        "organization; offline gazetteers, extra 'hypernym') to table caption_hypernyms. Off by default: README "
        "'Filters' gives its measured precision.",
    )

    def config(self) -> PrefilterConfig:
        return config_from(self, PrefilterConfig, languages=tuple(self.languages) if self.languages else None)


def _load_image(location: str) -> Image.Image:
    return decode_rgb(read_location(location), target_side=320)


@per_shard_asset(
    "prefilter",
    GROUP,
    deps=["image_index"],
    pool="gpu",
    kinds={"duckdb", "python"},
    description=(
        "One row per indexed file of the shard: whether it passed the image, caption and content "
        "filters, every reason it failed, and the scores behind them."
    ),
)
def prefilter(
    context: AssetExecutionContext,
    prefilters: PrefilterResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    cfg = prefilters.config()
    check_dependencies(cfg)
    wh = warehouse.get()
    started = time.perf_counter()
    frames = []
    no_image = 0
    replaced = 0
    for shard in context.partition_keys:
        index = read_image_index(wh, shard)
        part = run_prefilter(index, cfg, load_image=_load_image, log=context.log.info)
        no_image += sum(  # external embeddings: image-only rules were skipped on these rows
            st == "ok" and not has_image_data(f, b)
            for f, b, st in zip(index["format"].to_list(), index["bytes"].to_list(), index["status"].to_list())
        )
        wh.replace_partition("prefilter", part, "shard", shard)
        if cfg.hypernymize:
            from dedup_assets.filters.hypernym import hypernymize_frame

            hyp = hypernymize_frame(part)
            replace_caption_hypernyms(wh, shard, hyp)
            replaced += int(hyp["replacements"].sum())
        else:  # turned off: no stale hypernyms of this shard's old captions
            replace_caption_hypernyms(wh, shard, None)
        frames.append(part)
    df = pl.concat(frames) if frames else pl.DataFrame()
    seconds = time.perf_counter() - started
    summary = summarize_prefilter(df)
    passed = int(df["passed"].sum()) if df.height else 0
    removed_by = {str(k): int(v) for k, v in (summary.get("removed_by_reason") or {}).items()}
    return MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "passed": passed,
            "removed": df.height - passed,
            "removed_by_reason": counts_table(removed_by),
            "examples_by_reason": MetadataValue.json(summary.get("examples", {})),
            "thresholds": MetadataValue.json(cfg.describe()),
            "image_rules_skipped_no_image_data": MetadataValue.int(no_image),
            "names_replaced_by_hypernyms": replaced if cfg.hypernymize else MetadataValue.text("off"),
            "seconds": round(seconds, 3),
            "preview": table_preview(
                df.filter(~pl.col("passed")).with_columns(pl.col("reasons").list.join(","))
                .select("image_id", "reasons", "caption_clean")
            ),
        }
    )


class ClassifierResource(ConfigurableResource):
    """Filter classifiers trained from labels (table `labels`, `dedup-assets label`), one per label set."""

    target_recall: float = Field(
        default=0.95, description="Recall of labelled positives (cross-validated) the removal threshold must reach "
        "(biased toward removal: higher removes more).")
    queue_size: int = Field(default=48, description="Images per label set proposed for labelling next (per round).")
    queue_diversity: float = Field(
        default=0.9, description="No two proposed images have a cosine at or above this (near-copies are skipped).")


@asset(
    group_name=GROUP,
    deps=[AssetDep("embeddings", partition_mapping=AllPartitionMapping())],  # every shard's vectors
    partitions_def=label_sets_partitions,
    metadata={"dagster/column_schema": column_schema("classifier_scores")},
    kinds={"duckdb", "scikitlearn"},
    description=(
        "One filter classifier per label set (a partition of `label_sets`; the labels of table `labels` come from "
        "`dedup-assets label` or a labelling page): a logistic regression on the embeddings with calibrated "
        "probabilities, a removal threshold at the cross-validated recall target, every image scored (the set's "
        "rows of classifier_scores; filtered_dataset removes filter:classifier:<set>), and the next images to "
        "label (label_queue, labelling_<set>.html)."
    ),
)
def filter_classifiers(
    context: AssetExecutionContext, classifiers: ClassifierResource, warehouse: WarehouseResource
) -> MaterializeResult:
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup_assets import tables
    from dedup_assets.filters.classifier import MIN_LABELS, UncertaintyQueue, fit_filter_classifier
    from dedup_assets.filters.label_page import write_label_page

    label_set = check_label_set_name(context.partition_key)
    wh = warehouse.get()
    started = time.perf_counter()
    labels = tables.read_labels(wh, label_set)
    store = tables.embedding_store(wh)
    out = warehouse.directory / "classifiers" / label_set
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    want = dict(zip(labels["image_id"].to_list(), labels["label"].to_list()))
    vectors: dict[str, np.ndarray] = {}
    if want:
        for _, bids, bx in store.iter_batches(batch_rows=65_536):  # the labelled images' vectors, one pass
            for k, i in enumerate(bids):
                if i in want:
                    vectors[i] = bx[k]
    ids = [i for i in want if i in vectors]
    x = np.stack([vectors[i] for i in ids]) if ids else np.zeros((0, store.dim() or 0), np.float32)
    y = np.array([want[i] for i in ids], bool)
    pos, neg = int(y.sum()), int((~y).sum())
    no_vector = len(want) - len(ids)
    empty_queue = pl.DataFrame(schema=tables.LABEL_QUEUE_SCHEMA)
    if min(pos, neg) < MIN_LABELS:
        tables.replace_classifier_scores(wh, label_set, [], empty_queue)
        status = (f"needs ≥ {MIN_LABELS} labels of each kind with vectors (has {pos} positive, {neg} negative"
                  + (f"; {no_vector} labelled images have no vector" if no_vector else "") + "): nothing removed")
        context.log.warning(f"label set {label_set!r}: {status}")
        return MaterializeResult(metadata={"status": status, "positives": pos, "negatives": neg, "images_removed": 0,
                                           "dagster/row_count": 0})
    clf = fit_filter_classifier(x, y, target_recall=classifiers.target_recall)
    context.log.info(f"label set {label_set!r}: {pos}+/{neg}- labels, {clf.folds}-fold CV recall {clf.cv_recall:.3f} "
                     f"precision {clf.cv_precision:.3f} at threshold {clf.threshold:.3f} (calibrated probability "
                     f"{clf.threshold_probability:.3f}); out-of-fold Brier {clf.cv_brier:.3f} "
                     f"(uncalibrated {clf.cv_brier_uncalibrated:.3f})")
    queue = UncertaintyQueue(clf.threshold)
    parts, scored = [], 0
    for n, (_, bids, bx) in enumerate(store.iter_batches(batch_rows=65_536)):
        score = clf.score(bx)
        part = out / f"part_{n:05d}.parquet"
        pq.write_table(pa.table({"image_id": bids, "label_set": [label_set] * len(bids), "score": score,
                                 "probability": clf.probability(score), "remove": score >= clf.threshold}), part)
        parts.append(part)
        queue.add(bids, score, bx, set(want))
        scored += len(bids)
        if n % 16 == 15:
            rate = scored / max(time.perf_counter() - started, 1e-9)
            context.log.info(f"label set {label_set!r}: {scored:,} images scored ({rate:,.0f}/s)")
    nxt = queue.next(classifiers.queue_size, classifiers.queue_diversity)
    queue_df = pl.DataFrame([(label_set, r + 1, i, s) for r, (i, s) in enumerate(nxt)],
                            schema=tables.LABEL_QUEUE_SCHEMA, orient="row")
    removed = tables.replace_classifier_scores(wh, label_set, parts, queue_df)
    shutil.rmtree(out, ignore_errors=True)
    qids = [i for i, _ in nxt]
    locs = wh.read_table("image_index", columns=["image_id", "location"], where="list_contains($ids, image_id)",
                         params={"ids": qids}) if qids else pl.DataFrame({"image_id": [], "location": []})
    page_path = write_label_page(
        label_set, nxt, dict(zip(locs["image_id"].to_list(), locs["location"].to_list())), clf.threshold,
        warehouse.directory / f"labelling_{label_set}.html",
        {"positives": clf.positives, "negatives": clf.negatives, "cv_recall": clf.cv_recall,
         "cv_precision": clf.cv_precision})
    return MaterializeResult(metadata={
        "status": "trained",
        "labels": clf.positives + clf.negatives,
        "positives": clf.positives,
        "negatives": clf.negatives,
        "labelled_without_vector": no_vector,
        "cv_folds": clf.folds,
        "cv_recall": round(clf.cv_recall, 4),
        "cv_precision": round(clf.cv_precision, 4),
        "threshold": round(clf.threshold, 4),
        "threshold_probability": round(clf.threshold_probability, 4),
        "cv_brier": round(clf.cv_brier, 4),
        "cv_brier_uncalibrated": round(clf.cv_brier_uncalibrated, 4),
        "cv_calibration_error": round(clf.cv_ece, 4),
        "images_removed": removed,
        "dagster/row_count": scored,
        "queued_for_labelling": len(nxt),
        "labelling_page": warehouse.link(page_path),
        "next_to_label": table_preview(queue_df.select("rank", "image_id", "score")),
        "seconds": round(time.perf_counter() - started, 3),
    })


@sensor(
    job_name="classifier_job",
    minimum_interval_seconds=60,
    description=(
        "Retrains a label set's filter classifier when its labels change (new labels from `dedup-assets label` or "
        "a labelling page's download) or new embeddings arrive (new shards must be scored too): adds the set as a "
        "partition of label_sets and requests its run."
    ),
)
def label_sensor(context: SensorEvaluationContext, warehouse: WarehouseResource) -> SensorResult:
    import json

    from dagster import AssetKey

    from dedup_assets import tables
    from dedup_assets.defs.partitions import LABEL_SETS_PARTITIONS_NAME

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    latest = context.instance.fetch_materializations(AssetKey("embeddings"), limit=1).records
    vectors = str(latest[0].storage_id) if latest else "-"  # changes whenever any shard is (re-)embedded
    now, bad = {}, []
    for name, n, last in tables.label_set_versions(warehouse.get()):
        try:
            now[check_label_set_name(name)] = f"{n}|{last}|{vectors}"
        except ValueError as e:  # written to `labels` by hand, not by `dedup-assets label`
            bad.append(str(e))
    for line in bad:
        context.log.warning(f"skipped: {line}")
    changed = [name for name, version in now.items() if seen.get(name) != version]
    known = set(context.instance.get_dynamic_partitions(LABEL_SETS_PARTITIONS_NAME))
    new = [name for name in changed if name not in known]
    return SensorResult(
        run_requests=[RunRequest(run_key=f"labels:{name}:{now[name]}", partition_key=name) for name in changed],
        dynamic_partitions_requests=[label_sets_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(now, sort_keys=True),
    )
