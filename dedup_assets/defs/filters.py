"""Filter stage: the per-shard `prefilter` asset (image, caption and content-safety filters)."""


import time

import polars as pl
from dagster import AssetExecutionContext, ConfigurableResource, MaterializeResult, MetadataValue, asset
from PIL import Image
from pydantic import Field

from dedup_assets.defs.metadata import counts_table, table_preview
from dedup_assets.defs.partitions import per_shard_asset
from dedup_assets.defs.resources import WarehouseResource, config_from
from dedup_assets.filters.config import PrefilterConfig, check_dependencies
from dedup_assets.filters.run import has_image_data, run_prefilter, summarize_prefilter
from dedup_assets.ingest.decode import decode_rgb
from dedup_assets.ingest.shards import read_location
from dedup_assets.tables import column_schema, read_image_index

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
            wh.replace_partition("caption_hypernyms", hyp, "shard", shard)
            replaced += int(hyp["replacements"].sum())
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
    deps=["embeddings"],
    metadata={"dagster/column_schema": column_schema("classifier_scores")},
    kinds={"duckdb", "scikitlearn"},
    description=(
        "One classifier per label set of table `labels` (a few positive/negative images, from `dedup-assets "
        "label` or a labelling page): a logistic regression on the embeddings, a removal threshold at the "
        "cross-validated recall target, every image scored (classifier_scores; filtered_dataset removes "
        "filter:classifier:<set>), and the next images to label (label_queue, labelling_<set>.html)."
    ),
)
def filter_classifiers(
    context: AssetExecutionContext, classifiers: ClassifierResource, warehouse: WarehouseResource
) -> MaterializeResult:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup_assets import tables
    from dedup_assets.filters.classifier import MIN_LABELS, UncertaintyQueue, fit_filter_classifier
    from dedup_assets.filters.label_page import write_label_page

    wh = warehouse.get()
    started = time.perf_counter()
    labels = tables.read_labels(wh)
    store = tables.embedding_store(wh)
    out = warehouse.directory / "classifiers"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    meta: dict = {"label_sets": MetadataValue.json(sorted(set(labels["label_set"].to_list())))}
    parts, queues, fitted = [], [], []
    labelled_ids = set(labels["image_id"].to_list())
    vectors: dict[str, np.ndarray] = {}
    if labelled_ids:
        for _, bids, bx in store.iter_batches(batch_rows=65_536):  # every labelled image's vector, one pass
            for k, i in enumerate(bids):
                if i in labelled_ids:
                    vectors[i] = bx[k]
    for label_set, rows in sorted(labels.group_by("label_set"), key=lambda kv: kv[0][0]):
        label_set = str(label_set[0])
        want = dict(zip(rows["image_id"].to_list(), rows["label"].to_list()))
        ids = [i for i in want if i in vectors]
        x = np.stack([vectors[i] for i in ids]) if ids else np.zeros((0, store.dim() or 0), np.float32)
        y = np.array([want[i] for i in ids], bool)
        if min(int(y.sum()), int((~y).sum())) < MIN_LABELS:
            context.log.warning(f"label set {label_set!r}: {int(y.sum())} positive / {int((~y).sum())} negative labels "
                                f"with vectors; needs {MIN_LABELS} of each — no classifier, nothing removed")
            meta[f"{label_set}_status"] = f"needs ≥ {MIN_LABELS} labels of each kind (has {int(y.sum())}/{int((~y).sum())})"
            continue
        clf = fit_filter_classifier(x, y, target_recall=classifiers.target_recall)
        queue = UncertaintyQueue(clf.threshold)
        labelled = set(want)
        for n, (_, bids, bx) in enumerate(store.iter_batches(batch_rows=65_536)):
            score = clf.score(bx)
            part = out / f"{label_set}_{n:05d}.parquet"
            pq.write_table(pa.table({"image_id": bids, "label_set": [label_set] * len(bids), "score": score,
                                     "remove": score >= clf.threshold}), part)
            parts.append(part)
            queue.add(bids, score, bx, labelled)
        nxt = queue.next(classifiers.queue_size, classifiers.queue_diversity)
        queues += [(label_set, r + 1, i, s) for r, (i, s) in enumerate(nxt)]
        fitted.append((label_set, clf, nxt))
        meta.update({
            f"{label_set}_labels": clf.positives + clf.negatives,
            f"{label_set}_cv_recall": round(clf.cv_recall, 4),
            f"{label_set}_cv_precision": round(clf.cv_precision, 4),
            f"{label_set}_threshold": round(clf.threshold, 4),
        })
        context.log.info(f"label set {label_set!r}: {clf.positives}+/{clf.negatives}- labels, {clf.folds}-fold CV "
                         f"recall {clf.cv_recall:.3f} precision {clf.cv_precision:.3f} at threshold {clf.threshold:.3f}")
    queue_df = pl.DataFrame(queues, schema={"label_set": pl.String, "rank": pl.Int32, "image_id": pl.String,
                                            "score": pl.Float64}, orient="row")
    removed = tables.replace_classifier_scores(wh, [f[0] for f in fitted], parts, queue_df)
    for p in parts:
        p.unlink()
    for label_set, clf, nxt in fitted:
        ids = [i for i, _ in nxt]
        locs = wh.read_table("image_index", columns=["image_id", "location"], where="list_contains($ids, image_id)",
                             params={"ids": ids}) if ids else pl.DataFrame({"image_id": [], "location": []})
        page_path = write_label_page(
            label_set, nxt, dict(zip(locs["image_id"].to_list(), locs["location"].to_list())), clf.threshold,
            warehouse.directory / f"labelling_{label_set}.html",
            {"positives": clf.positives, "negatives": clf.negatives, "cv_recall": clf.cv_recall,
             "cv_precision": clf.cv_precision})
        meta[f"{label_set}_removed"] = removed.get(label_set, 0)
        meta[f"{label_set}_labelling_page"] = warehouse.link(page_path)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["dagster/row_count"] = int(wh.query("SELECT count(*) AS n FROM classifier_scores")["n"][0])
    meta["images_removed"] = sum(removed.values())
    return MaterializeResult(metadata=meta)
