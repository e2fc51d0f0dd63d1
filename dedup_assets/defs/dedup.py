"""Dedup stage: five clusterings, the bucketed pair search (+ recall check), duplicate groups.

Nothing here holds every vector or every id. `clusterings` fits each clustering on its own random
sample read from the embedding store, then streams the store partition by partition: every
vector is assigned to its nearest (and second-nearest) centroid of all clusterings in one pass
and written to the bucket files of its clusters. `candidate_pairs` is a graph of steps: a plan
step emits one dynamic output per bucket, one `search_bucket` step per bucket holds only that
bucket's vectors (so executors run buckets in parallel processes, on Celery workers or on k8s
pods with a GPU each), and a merge step unions the buckets' pairs in DuckDB. `duplicate_groups`
runs the greedy no-chaining keeper rule in DuckDB. The algorithms live in `dedup_assets.dedup`,
the tables and files in `dedup_assets.tables`; this module reads, calls, writes, reports.
"""


import os
import socket
import time
import uuid
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    ConfigurableResource,
    DynamicOut,
    DynamicOutput,
    In,
    MaterializeResult,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    asset,
    asset_check,
    graph_asset,
    op,
)
from pydantic import Field

from dedup_assets.audit.page import AUDIT_PAGE
from dedup_assets.dedup.buckets import (
    BucketStats,
    bucket_pair_chunks,
    choose_n_buckets,
    fit_bucket_count,
    plan_buckets,
    route,
)
from dedup_assets.dedup.incremental import needs_refit
from dedup_assets.dedup.kernels import describe_backend
from dedup_assets.dedup.kmeans import (
    assign_many,
    choose_k,
    default_subset_size,
    fit_centroids,
    probe_many,
    split_large_clusters,
)
from dedup_assets.dedup.recall import sampled_true_pairs, streamed_recall
from dedup_assets.dedup.review_page import GROUPS_PAGE, write_groups_review_html
from dedup_assets.dedup.verify import VerifyConfig, verify_candidates
from dedup_assets.defs.metadata import bar_plot_png, counts_table, table_preview
from dedup_assets.defs.resources import EmbedderResource, WarehouseResource
from dedup_assets.tables import (
    CLUSTERINGS_SCHEMA,
    CorpusFiles,
    Fit,
    build_duplicate_groups,
    candidate_pair_count,
    clear_verify_chunks,
    column_schema,
    merge_verified_pairs,
    read_candidate_chunk,
    verify_dir,
    write_verify_chunk,
    embedding_store,
    forget_assignments,
    PAIR_FILE_FORMAT,
    merge_candidate_pairs,
    pair_summary,
    read_assigned_partitions,
    read_fit,
    record_assigned_partition,
    resolve_threshold,
    search_threshold,
    write_clusterings,
    write_fit,
)
from dedup_assets.warehouse import Warehouse

GROUP = "dedup"


class DedupResource(ConfigurableResource):
    """Settings of the whole dedup chain (shared by the assets and the recall check)."""

    n_clusterings: int = Field(default=5, description="k-means clusterings, each on a different random subset.")
    k: int | None = Field(default=None, description="Clusters per clustering; None = rule by N (README).")
    subset_size: int | None = Field(default=None, description="Points per k-means fit; None = rule by N and K.")
    niter: int = Field(default=20, description="k-means iterations per clustering.")
    soft: bool = Field(default=True, description="Also join each image's second-nearest cluster (recall at ~4× the comparisons).")
    threshold: float | None = Field(
        default=None, description="Cosine τ for a duplicate pair; None = the embedder's calibrated value."
    )
    block_size: int = Field(default=4096, description="Rows per block in the pair search (memory bound).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where k-means, assignment and the pair search run: auto = a CUDA GPU when visible."
    )
    n_buckets: int | None = Field(
        default=None, description="Buckets of clusters = parallel pair-search steps; None = one per rows_per_bucket vectors (at least 2)."
    )
    rows_per_bucket: int = Field(default=200_000, description="The bucket rule's vectors per bucket (memory of one step).")
    assign_batch_rows: int = Field(default=65_536, description="Vectors read and assigned at a time.")
    max_cluster_factor: float | None = Field(
        default=4.0, description="Split clusters holding more than this multiple of the mean share of the fit sample (None = never)."
    )
    probes: int = Field(
        default=2, description="Clusters a vector may join per clustering: 1 = hard, 2 = soft; more = extra probes within probe_margin."
    )
    probe_margin: float = Field(default=0.02, description="Probes beyond the second need a centroid similarity within this of the nearest.")
    soft_margin: float | None = Field(
        default=0.1,
        description="The second cluster only where its centroid similarity is within this of the nearest (None = always).",
    )
    keeper_policy: Literal["resolution", "priority"] = Field(
        default="resolution",
        description="Which image of a group is kept: resolution = largest width × height, then bytes; "
        "priority = highest value of priority_column.",
    )
    priority_column: str | None = Field(
        default=None, description="image_index column whose highest value wins (policy 'priority')."
    )
    recall_sample: int = Field(default=2000, description="Images sampled by the recall estimate.")
    recall_target: float = Field(default=0.95, description="The recall check warns below this.")
    seed: int = Field(default=0, description="Seed of the k-means samples, fits, bucket plan and recall sample.")
    incremental: bool = Field(
        default=True, description="Assign new images to the stored centroids and search only their pairs."
    )
    refit_factor: float = Field(
        default=2.0, description="Refit anyway once the corpus exceeds this multiple of its size at the last fit."
    )

    verify: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Geometric verification of candidate pairs (verified_pairs): 'auto' = on for the offline "
        "embedder, off for open_clip and external vectors (no images to read); 'on' needs image files.",
    )
    notion: Literal["copy", "near_duplicate"] = Field(
        default="copy",
        description="What verification accepts: 'copy' (the default) = the same picture after edits, so a removed "
        "image is a copy of its keeper; 'near_duplicate' = the seed's looser notion, also one layout with other "
        "details (a clock at another hour, another text on one template). README 'Verification'.",
    )
    verify_margin: float = Field(
        default=0.1,
        description="With verification on, candidates are searched at τ minus this (cosine units), so that "
        "copies the vectors put just below τ reach the verifier.",
    )
    band_margin: float = Field(
        default=0.3,
        description="With verification on, each image's band_top_k most similar neighbours (within a shared "
        "cluster) down to τ minus this (cosine units) are candidates too: copies far below τ reach the verifier "
        "at a cost bounded per image.",
    )
    band_top_k: int = Field(
        default=20, description="Neighbours per image taken from the band below τ − verify_margin (0 = no band)."
    )
    verify_pairs_per_step: int = Field(
        default=20_000, description="Candidate pairs per verification step (the fan-out of verified_pairs)."
    )
    verify_cache_mb: int = Field(default=256, description="Memory for cached keypoints per verification step, in MB.")

    def tau(self, embedder: EmbedderResource) -> float:
        """τ of a duplicate edge (resolution in `tables.resolve_threshold`)."""
        return resolve_threshold(self.threshold, embedder)

    def verifying(self, embedder: EmbedderResource) -> bool:
        if self.verify == "auto":
            return embedder.kind == "offline"
        if self.verify == "on" and embedder.kind == "external":
            raise ValueError("verify='on' needs images; external embeddings have none (use 'auto' or 'off')")
        return self.verify == "on"

    def search_tau(self, embedder: EmbedderResource) -> float:
        """The cosine down to which every pair is a candidate (τ, or τ − verify_margin when verifying)."""
        return search_threshold(self.tau(embedder), self.verifying(embedder), self.verify_margin)

    def edge_floor(self, embedder: EmbedderResource) -> float:
        """The lowest cosine a duplicate edge can have (where the review page's τ slider starts)."""
        band = self.band(embedder)
        return band[0] if band else self.search_tau(embedder)

    def band(self, embedder: EmbedderResource) -> tuple[float, float, int] | None:
        """(floor, hi, k) of the band searched below search_tau, or None (no verification, or k = 0)."""
        if not self.verifying(embedder) or self.band_top_k <= 0:
            return None
        hi = self.search_tau(embedder)
        floor = search_threshold(self.tau(embedder), True, max(self.band_margin, self.verify_margin))
        return (floor, hi, int(self.band_top_k)) if floor < hi else None

    def verify_config(self) -> VerifyConfig:
        return VerifyConfig(notion=self.notion)


class ClusteringsConfig(Config):
    """Run config of `clusterings`: a full refit is an explicit action."""

    refit: bool = False


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _fit(store, n: int, model: str, dedup: DedupResource, log) -> tuple[Fit, list[np.ndarray], float]:  # noqa: ANN001
    """Fit every clustering on its own random sample of the store, then plan the buckets."""
    t0 = time.perf_counter()
    k = dedup.k or choose_k(n)
    subset = min(n, dedup.subset_size) if dedup.subset_size else default_subset_size(n, k)
    cents, loads = [], []
    for c in range(dedup.n_clusterings):
        t1 = time.perf_counter()
        _, sample = store.sample(subset, seed=dedup.seed + 1000 * (c + 1))
        cc, load = fit_centroids(sample, k, dedup.niter, dedup.seed + c, dedup.device)
        k_fit = cc.shape[0]
        if dedup.max_cluster_factor and k_fit > 1:
            max_load = int(dedup.max_cluster_factor * sample.shape[0] / k_fit)
            cc, load = split_large_clusters(sample, cc, max_load, seed=dedup.seed + c, device=dedup.device)
        cents.append(cc)
        loads.append(load)
        log(f"clustering {c}: K={cc.shape[0]} ({cc.shape[0] - k_fit} from splitting large clusters) fitted on {sample.shape[0]} sampled vectors of {n} in {time.perf_counter() - t1:.1f}s")
    nb = dedup.n_buckets or choose_n_buckets(n, cents[0].shape[0], dedup.rows_per_bucket)
    buckets = plan_buckets(cents, loads, nb, seed=dedup.seed)
    if not dedup.n_buckets:  # size the buckets by routing the last fit sample (buckets.fit_bucket_count)
        labels = probe_many(sample, cents, max(2, dedup.probes), dedup.probe_margin, device=dedup.device,
                            second_margin=dedup.soft_margin) if dedup.soft else assign_many(
                                sample, cents, soft=False, device=dedup.device)
        nb, buckets = fit_bucket_count(cents, loads, labels, n, nb, dedup.rows_per_bucket, seed=dedup.seed, log=log)
    fit = Fit(
        fit_id=uuid.uuid4().hex[:12], model=model, n_at_fit=n, subset_size=int(subset),
        n_buckets=int(max(1, min(nb, cents[0].shape[0]))), soft=dedup.soft,
        centroids=cents, buckets=buckets,
    )
    return fit, loads, time.perf_counter() - t0


@asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": column_schema("clusterings")},
    deps=["embeddings"],
    pool="gpu",
    kinds={"duckdb", "faiss"},
    description=(
        "One row per (image, clustering): the k-means cluster of every embedded image in each of "
        "the clusterings, each fitted on a different random sample of the store (cluster2 = second-"
        "nearest cluster when soft assignment is on). Also writes every vector to the bucket files "
        "of its clusters for the bucketed pair search. New or changed partitions are assigned to the "
        "stored centroids until the corpus outgrows them (refit_factor) or a refit is asked for."
    ),
)
def clusterings(
    context: AssetExecutionContext, config: ClusteringsConfig, dedup: DedupResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    log = context.log.info
    log(describe_backend(dedup.device))
    store = embedding_store(wh)
    models = sorted(store.models())
    if len(models) > 1:
        raise RuntimeError(f"the embedding store mixes models {models}; re-embed every shard with one model first")
    model = models[0] if models else ""
    counts = store.counts()
    n = int(sum(counts.values()))
    files = CorpusFiles(wh)
    started = time.perf_counter()
    fit = None if config.refit or not dedup.incremental else read_fit(wh)
    if fit is not None and (fit.model != model or fit.n_clusterings != dedup.n_clusterings or fit.soft != dedup.soft):
        log("the stored fit is for another model or settings: refitting")
        fit = None
    if fit is not None and needs_refit(n, fit.n_at_fit, dedup.refit_factor):
        log(f"corpus grew from {fit.n_at_fit} to {n} images (> {dedup.refit_factor}×): refitting")
        fit = None
    fit_s = 0.0
    if fit is None:
        mode = "full"
        if n == 0:
            forget_assignments(wh)
            return MaterializeResult(metadata={"dagster/row_count": 0, "mode": "empty", "images": 0})
        fit, loads, fit_s = _fit(store, n, model, dedup, log)
        write_fit(wh, fit, loads)
        forget_assignments(wh)
    else:
        mode = "incremental"
    files.drop_other_fits(fit.fit_id)

    assigned = read_assigned_partitions(wh, fit.fit_id)
    # an assignment is stale when its store file or the probe settings change
    probe_key = f"|soft={fit.soft}:probes={dedup.probes}:{dedup.probe_margin}:{dedup.soft_margin}"
    stamps = {p: _stamp(store.path_of(p)) + probe_key for p in counts}
    for p in sorted(set(assigned) - set(counts)):  # partitions whose vectors are gone
        files.delete_partition(fit.fit_id, p)
        forget_assignments(wh, p)
    todo = [p for p in sorted(counts) if assigned.get(p) != stamps[p]]
    new_rows = sum(counts[p] for p in todo)
    done = 0
    spill_rows = 0
    extra_probes = 0
    second_probes = 0
    t_assign = time.perf_counter()
    for p in todo:
        files.delete_partition(fit.fit_id, p)
        frames = []
        for batch_no, (_, ids, x) in enumerate(store.iter_batches([p], batch_rows=dedup.assign_batch_rows)):
            if fit.soft:
                probed = probe_many(x, fit.centroids, max(2, dedup.probes), dedup.probe_margin, device=dedup.device,
                                    second_margin=dedup.soft_margin)
                labels = [(m[:, 0], m[:, 1]) for m in probed]
                routing = probed
            else:
                labels = assign_many(x, fit.centroids, soft=fit.soft, device=dedup.device)
                routing = labels
            if routing is not labels:
                extra_probes += sum(int((m[:, 2:] >= 0).sum()) for m in routing)
                second_probes += sum(int((m[:, 1] >= 0).sum()) for m in routing)
            for b, r in route(routing, fit.buckets).items():
                files.write_batch(
                    fit.fit_id, b, p, batch_no, [ids[i] for i in r.rows.tolist()], x[r.rows],
                    {"vec": r.vec, "clustering": r.clustering, "cluster": r.cluster, "cluster2": r.cluster2},
                )
                spill_rows += int(r.rows.size)
            m = len(ids)
            frames.append(pl.DataFrame(
                {
                    "image_id": ids * fit.n_clusterings,
                    "shard": [p] * (m * fit.n_clusterings),
                    "clustering": np.repeat(np.arange(fit.n_clusterings, dtype=np.int32), m),
                    "cluster": np.concatenate([lab[0] for lab in labels]).astype(np.int32),
                    "cluster2": (np.concatenate([lab[1] for lab in labels]).astype(np.int32) if fit.soft else None),
                },
                schema=CLUSTERINGS_SCHEMA,
            ).with_columns(pl.when(pl.col("cluster2") >= 0).then(pl.col("cluster2")).alias("cluster2")))
            done += m
        write_clusterings(wh, p, pl.concat(frames) if frames else pl.DataFrame(schema=CLUSTERINGS_SCHEMA))
        record_assigned_partition(wh, p, fit.fit_id, counts[p], stamps[p])
        dt = time.perf_counter() - t_assign
        log(f"assigned partition {p}: {done}/{new_rows} vectors ({done / max(dt, 1e-9):.0f}/s)")
    assign_s = time.perf_counter() - t_assign
    bucket_rows = [sum(pq_rows(s) for _, s in files.batches(fit.fit_id, b)) for b in range(fit.n_buckets)]
    sizes = wh.query("SELECT cluster, count(*) AS n FROM clusterings WHERE clustering = 0 GROUP BY cluster")
    size_arr = np.bincount(sizes["cluster"].to_numpy(), weights=sizes["n"].to_numpy(), minlength=fit.k) if sizes.height else np.zeros(fit.k)
    meta = {
        "dagster/row_count": n * fit.n_clusterings,
        "mode": mode,
        "fit_id": fit.fit_id,
        "images": n,
        "newly_assigned": new_rows,
        "partitions_assigned": len(todo),
        "model": model,
        "clusterings": fit.n_clusterings,
        "K": fit.k,
        "subset_size": fit.subset_size,
        "buckets": fit.n_buckets,
        "vectors_per_bucket": MetadataValue.json(bucket_rows),
        "second_cluster_share": round(second_probes / max(new_rows * fit.n_clusterings, 1), 3),
        "extra_probes_per_image": round(extra_probes / max(new_rows, 1), 3),
        "bucket_copies_per_image": round(sum(bucket_rows) / max(n, 1), 3),
        "bucket_files_bytes": files.spill_bytes(fit.fit_id),
        "fit_seconds": round(fit_s, 3),
        "assign_seconds": round(assign_s, 3),
        "assigned_per_second": round(new_rows / max(assign_s, 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 3),
        "empty_clusters": int((size_arr == 0).sum()),
        "largest_cluster": int(size_arr.max()) if size_arr.size else 0,
    }
    if n:
        hist_labels, hist_values = _size_histogram(size_arr)
        meta["cluster_sizes_plot"] = warehouse.plot(
            bar_plot_png(hist_labels, hist_values, "cluster sizes (clustering 0)", "images per cluster", "clusters"),
            "cluster size distribution", "clusterings_cluster_sizes",
        )
    return MaterializeResult(metadata=meta)


def pq_rows(stem: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(f"{stem}.ids.parquet").metadata.num_rows)

def _size_histogram(sizes: np.ndarray) -> tuple[list[str], list[float]]:
    edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10**12]
    labels, values = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        labels.append(f"{lo}" if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi < 10**12 else f"≥{lo}"))
        values.append(float(((sizes >= lo) & (sizes < hi)).sum()))
    while len(values) > 1 and values[-1] == 0:
        labels.pop()
        values.pop()
    return labels, values


@op(
    ins={"after": In(Nothing)},
    out=DynamicOut(int),
    description="One dynamic output per bucket of the current fit (each becomes a search_bucket step).",
)
def plan_bucket_search(context: OpExecutionContext, warehouse: WarehouseResource):  # noqa: ANN201
    fit = read_fit(warehouse.get())
    if fit is None:
        context.log.info("no clustering fit (empty corpus): nothing to search")
        yield DynamicOutput(-1, mapping_key="none")
        return
    context.log.info(f"fit {fit.fit_id}: {fit.n_buckets} bucket(s) to search")
    for b in range(fit.n_buckets):
        yield DynamicOutput(b, mapping_key=f"bucket_{b:04d}")


@op(
    pool="gpu",
    tags={"dedup-assets/step": "bucket"},
    description="Exact pairs ≥ τ inside every cluster of one bucket (all clusterings); writes the bucket's pair file.",
)
def search_bucket(
    context: OpExecutionContext, bucket: int, dedup: DedupResource, embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> dict:
    t0 = time.perf_counter()
    wh = warehouse.get()
    fit = read_fit(wh)
    band = dedup.band(embedder)
    tau = band[0] if band else dedup.search_tau(embedder)
    band_args = (band[1], band[2]) if band else None
    if fit is None or bucket < 0:
        return {"bucket": bucket, "vectors": 0, "pairs": 0, "new_pairs": 0, "comparisons": 0, "seconds": 0.0,
                "mode": "empty"}
    context.log.info(describe_backend(dedup.device))
    files = CorpusFiles(wh)
    data = files.read_bucket(fit.fit_id, bucket, int(fit.centroids[0].shape[1]))
    stem_part = {stem.name: key for key, stem in files.batches(fit.fit_id, bucket)}
    manifest = files.read_pairs_manifest(fit.fit_id, bucket) if dedup.incremental else None
    old_dirty = None
    is_new = None
    mode = "full"
    if (manifest and manifest.get("fit_id") == fit.fit_id and manifest.get("threshold") == tau
            and manifest.get("band") == (list(band_args) if band_args else None)
            and manifest.get("format") == PAIR_FILE_FORMAT and manifest.get("duckdb") == duckdb.__version__
            and files.pairs_path(fit.fit_id, bucket).exists()):
        before = manifest.get("stamps", {})
        dirty = {stem_part[s] for s, st in data.stamps.items() if before.get(s) != st}
        dirty |= {manifest.get("partitions", {}).get(s, "") for s in set(before) - set(data.stamps)}
        old_dirty = sorted(dirty)
        dirty_idx = [i for i, key in enumerate(data.partitions) if key in dirty]
        is_new = np.isin(data.partition_of, dirty_idx)
        mode = "incremental"
    ent = data.entries
    n_vec = len(data.ids)
    context.log.info(
        f"bucket {bucket} in process {os.getpid()} (group {os.getpgid(0)}) on {socket.gethostname()}: "
        f"{n_vec} vectors, {ent['vec'].size} cluster entries"
        + (f" ({int(is_new.sum())} new)" if is_new is not None else "")
    )

    def progress(done: int, total: int) -> None:
        context.log.info(f"bucket {bucket}: clustering {done}/{total} searched after {time.perf_counter() - t0:.1f}s "
                         f"({spill.rows_added:,} pair rows so far)")

    stats = BucketStats()
    spill = files.pair_spill(fit.fit_id, bucket)
    try:
        if is_new is None or is_new.any():
            for chunk in bucket_pair_chunks(
                data.vectors.take, ent["vec"], ent["clustering"], ent["cluster"], ent["cluster2"], tau, stats,
                block_size=dedup.block_size, device=dedup.device, is_new=is_new, progress=progress, band=band_args,
            ):
                spill.add(*chunk)
        n_new, n_total = spill.finish(
            data.ids, data.partitions, data.partition_of,
            {"fit_id": fit.fit_id, "threshold": tau, "band": list(band_args) if band_args else None,
             "format": PAIR_FILE_FORMAT, "duckdb": duckdb.__version__,  # its hash() places pairs in merge passes
             "stamps": data.stamps, "partitions": stem_part},
            old_dirty=old_dirty,
        )
    finally:
        spill.close()
    seconds = time.perf_counter() - t0
    context.log.info(
        f"bucket {bucket}: {n_new:,} new pairs ({n_total:,} in all), {stats.comparisons:,} comparisons in {seconds:.1f}s "
        f"({stats.comparisons / max(seconds, 1e-9) / 1e6:.1f}M/s), largest cluster {stats.largest_cluster}"
    )
    return {
        "bucket": bucket, "vectors": n_vec, "entries": int(ent["vec"].size), "pairs": n_total, "new_pairs": n_new,
        "comparisons": int(stats.comparisons), "largest_cluster": stats.largest_cluster, "seconds": round(seconds, 3),
        "mode": mode,
    }


@op(description="candidate_pairs = the union of every bucket's pairs (DuckDB), with its metadata.")
def merge_bucket_pairs(
    context: OpExecutionContext, searched: list[dict], dedup: DedupResource, embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> dict:
    t0 = time.perf_counter()
    wh = warehouse.get()
    fit = read_fit(wh)
    files = CorpusFiles(wh)
    paths = files.pair_files(fit.fit_id, fit.n_buckets) if fit is not None else []
    rows = merge_candidate_pairs(wh, paths)
    n_c = fit.n_clusterings if fit is not None else dedup.n_clusterings
    summary = pair_summary(wh, n_c)
    cum = summary["cumulative"]
    gains = [cum[0]] + [b - a for a, b in zip(cum, cum[1:])] if cum else []
    n = int(wh.query("SELECT count(*) AS n FROM clusterings WHERE clustering = 0")["n"][0]) if fit is not None else 0
    all_pairs = n * (n - 1) // 2
    comparisons = sum(int(s.get("comparisons", 0)) for s in searched)
    bucket_seconds = [float(s.get("seconds", 0.0)) for s in sorted(searched, key=lambda s: s["bucket"])]
    modes = {s.get("mode") for s in searched}
    seconds = time.perf_counter() - t0
    preview = wh.query("SELECT * FROM candidate_pairs ORDER BY similarity DESC LIMIT 10")
    context.add_output_metadata(
        {
            "dagster/row_count": rows,
            "mode": "incremental" if modes == {"incremental"} else ("empty" if modes <= {"empty"} else "full"),
            "new_pairs": sum(int(s.get("new_pairs", 0)) for s in searched),
            "threshold": dedup.search_tau(embedder),
            "band": MetadataValue.text(
                f"each image's {b[2]} most similar pairs per cluster in [{b[0]:.3f}, {b[1]:.3f})" if (b := dedup.band(embedder))
                else "none"),
            "buckets": len(searched),
            "bucket_seconds": MetadataValue.json(bucket_seconds),
            "bucket_vectors": MetadataValue.json([int(s.get("vectors", 0)) for s in sorted(searched, key=lambda s: s["bucket"])]),
            "pairs_per_clustering": MetadataValue.json(summary["per_clustering"]),
            "marginal_gain_per_added_clustering": MetadataValue.json(gains),
            "comparisons": int(comparisons),
            "all_pairs_n2_over_2": all_pairs,
            "comparison_fraction": round(comparisons / all_pairs, 6) if all_pairs else 0.0,
            "merge_seconds": round(seconds, 3),
            "search_seconds_sum": round(sum(bucket_seconds), 3),
            "preview": table_preview(preview),
        }
    )
    return {"pairs": rows, "fit_id": fit.fit_id if fit is not None else None}


@graph_asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": column_schema("candidate_pairs")},
    ins={"clusterings": AssetIn(dagster_type=Nothing)},
    kinds={"duckdb", "numpy"},
    description=(
        "One row per candidate duplicate pair (image_a < image_b) with cosine ≥ τ, found by an "
        "exact search inside shared clusters; found_by is a bitmask of the clusterings that found "
        "it. Computed as one search_bucket step per bucket of clusters (parallel under the "
        "multiprocess, Celery or k8s executors), then merged in DuckDB."
    ),
)
def candidate_pairs(clusterings):  # noqa: ANN001, ANN201
    searched = plan_bucket_search(after=clusterings).map(search_bucket)
    return merge_bucket_pairs(searched.collect())


@asset_check(
    asset=candidate_pairs,
    description=(
        "Recall estimate: samples images from the store, finds their exact neighbours ≥ τ by "
        "streaming every vector, and warns when the fraction present in candidate_pairs is below "
        "the target (bootstrap interval over the sampled images)."
    ),
)
def candidate_pairs_recall(
    context: AssetCheckExecutionContext,
    dedup: DedupResource,
    embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> AssetCheckResult:
    wh = warehouse.get()
    store = embedding_store(wh)
    tau = dedup.search_tau(embedder)
    t0 = time.perf_counter()
    qids, q = store.sample(dedup.recall_sample, seed=dedup.seed + 7)
    batches = ((ids, x) for _, ids, x in store.iter_batches(batch_rows=16_384))  # 16k × sample sims in memory
    pq_, pid, psim = sampled_true_pairs(batches, qids, q, tau)
    sample_df = pl.DataFrame({"image_id": qids})
    with wh.connect() as con:
        con.register("__sample", sample_df)
        hits = con.sql(
            "SELECT p.image_a, p.image_b, p.found_by FROM candidate_pairs p WHERE p.image_a IN (SELECT image_id FROM __sample) "
            "OR p.image_b IN (SELECT image_id FROM __sample)"
        ).pl()
        con.unregister("__sample")
    found = {(a, b): int(f) for a, b, f in hits.iter_rows()}
    fit = read_fit(wh)
    n_c = fit.n_clusterings if fit is not None else dedup.n_clusterings
    est = streamed_recall(qids, pq_, pid, psim, found, tau, n_c, seed=dedup.seed)
    curve = {str(c + 1): round(r, 4) for c, r in enumerate(est.by_n_clusterings)}
    return AssetCheckResult(
        passed=est.recall >= dedup.recall_target,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "recall": round(est.recall, 4),
            "ci_95_bootstrap": MetadataValue.json([round(est.ci_low, 4), round(est.ci_high, 4)]),
            "target": dedup.recall_target,
            "sampled_images": est.n_sampled,
            "true_pairs_of_sample": est.n_true_pairs,
            "found": est.n_found,
            "dense_decile_recall": round(est.dense_recall, 4),
            "dense_decile_true_pairs": est.dense_true_pairs,
            "recall_by_number_of_clusterings": MetadataValue.json(curve),
            "threshold": tau,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )


@op(
    ins={"after": In(Nothing)},
    out=DynamicOut(int),
    description="One dynamic output per chunk of candidate pairs to verify (or one 'off' output when verification is off).",
)
def plan_verification(
    context: OpExecutionContext, dedup: DedupResource, embedder: EmbedderResource, warehouse: WarehouseResource
):  # noqa: ANN201
    wh = warehouse.get()
    clear_verify_chunks(wh)
    if not dedup.verifying(embedder):
        context.log.info(f"verification off (verify={dedup.verify!r}, embedder {embedder.kind!r}): pairs ≥ τ are duplicates")
        yield DynamicOutput(-1, mapping_key="off")
        return
    n = candidate_pair_count(wh)
    chunks = max(1, -(-n // max(1, dedup.verify_pairs_per_step)))
    context.log.info(f"{n} candidate pairs to verify in {chunks} step(s) ({dedup.notion!r} notion)")
    for c in range(chunks):
        yield DynamicOutput(c * 1_000_000 + chunks, mapping_key=f"chunk_{c:05d}")


def verify_image(data: bytes | None, location: str):  # noqa: ANN201 - PIL image
    """An image decoded for verification (at twice the analysis side): `data` when given, else the
    bytes at a training image's location (read with indexing's safety rules)."""
    from dedup_assets.ingest.decode import decode_rgb
    from dedup_assets.ingest.shards import read_location

    return decode_rgb(data if data is not None else read_location(location), target_side=2 * VerifyConfig().max_side)


def _verify_load(location: str):  # noqa: ANN202
    return verify_image(None, location)


@op(
    tags={"dedup-assets/step": "verify"},
    description="Geometric verification (SIFT + RANSAC, dedup.verify) of one chunk of candidate pairs.",
)
def verify_chunk(
    context: OpExecutionContext, task: int, dedup: DedupResource, embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> dict:
    if task < 0:
        return {"chunk": -1, "pairs": 0, "mode": "off"}
    chunk, n_chunks = task // 1_000_000, task % 1_000_000
    wh = warehouse.get()
    pairs = read_candidate_chunk(wh, chunk, n_chunks)
    tau = dedup.tau(embedder)

    def progress(st) -> None:  # noqa: ANN001
        context.log.info(
            f"chunk {chunk}: {st.pairs}/{pairs.height} pairs verified in {st.seconds:.1f}s "
            f"({st.pairs / max(st.seconds, 1e-9):.0f} pairs/s; {st.images_decoded} images decoded)"
        )

    df, st = verify_candidates(pairs, _verify_load, dedup.verify_config(), tau,
                               cache_bytes=dedup.verify_cache_mb << 20, progress=progress)
    write_verify_chunk(wh, chunk, df)
    context.log.info(
        f"chunk {chunk}: {st.pairs} pairs, {st.accepted} accepted, {st.undecided} undecided, "
        f"rejected {st.rejected}, {st.seconds:.1f}s, {st.images_decoded} images decoded ({st.cache_hits} cache hits)"
    )
    return {"chunk": chunk, "pairs": st.pairs, "accepted": st.accepted, "undecided": st.undecided,
            "rejected": st.rejected, "seconds": round(st.seconds, 3), "images_decoded": st.images_decoded,
            "cache_hits": st.cache_hits, "mode": "verified"}


@op(description="verified_pairs = the verification steps' verdicts (DuckDB), with its metadata.")
def merge_verification(
    context: OpExecutionContext, verified: list[dict], dedup: DedupResource, embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> None:
    wh = warehouse.get()
    tau = dedup.tau(embedder)
    off = any(v.get("mode") == "off" for v in verified)
    chunks = None if off else sorted(verify_dir(wh).glob("chunk_*.parquet"))
    counts = merge_verified_pairs(wh, chunks, tau)
    seconds = sum(float(v.get("seconds", 0.0)) for v in verified)
    checked = sum(int(v.get("pairs", 0)) for v in verified if v.get("mode") == "verified")
    rejected: dict[str, int] = {}
    for v in verified:
        for k, c in (v.get("rejected") or {}).items():
            rejected[k] = rejected.get(k, 0) + int(c)
    preview = wh.query(
        "SELECT image_a, image_b, similarity, is_duplicate, verdict, inliers, overlap, changed FROM verified_pairs "
        "ORDER BY is_duplicate, similarity DESC LIMIT 10"
    )
    context.add_output_metadata({
        "dagster/row_count": counts["pairs"],
        "verification": "off" if off else dedup.notion,
        "duplicate_edges": counts["duplicate_edges"],
        "pairs_by_verdict": MetadataValue.json(counts["by_verdict"]),
        "rejected_by_reason": MetadataValue.json(rejected),
        "threshold": tau,
        "search_threshold": dedup.search_tau(embedder),
        "steps": len(verified),
        "verify_seconds_sum": round(seconds, 3),
        "pairs_per_second": round(checked / seconds, 1) if seconds > 0 else None,
        "ms_per_pair": round(1000 * seconds / checked, 3) if checked else None,
        "images_decoded": sum(int(v.get("images_decoded", 0)) for v in verified),
        "preview": table_preview(preview),
    })


@graph_asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": column_schema("verified_pairs")},
    ins={"candidate_pairs": AssetIn(dagster_type=Nothing)},
    kinds={"duckdb", "opencv"},
    description=(
        "One row per candidate pair with its verification verdict (accepted, undecided:<why>, "
        "rejected:<why>, or not_verified) and whether it is a duplicate edge for duplicate_groups: "
        "local features (SIFT) matched under one similarity transform (RANSAC, mirror-aware), with "
        "rules on the overlap of the two pictures and, for the 'copy' notion, on their aligned "
        "content. Fans out as one verify_chunk step per chunk of pairs."
    ),
)
def verified_pairs(candidate_pairs):  # noqa: ANN001, ANN201
    return merge_verification(plan_verification(after=candidate_pairs).map(verify_chunk).collect())


@asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": column_schema("duplicate_groups")},
    deps=["verified_pairs", "image_index"],
    kinds={"duckdb"},
    description=(
        "One row per image that belongs to a duplicate group of two or more: group_id (the "
        "keeper's image_id), whether it is the keeper, its similarity to the keeper, and the "
        "group's size and tightness. No chaining: every removed image has a pair ≥ τ with its "
        "keeper (greedy keepers in rank order, README 'Duplicate groups')."
    ),
)
def duplicate_groups(
    context: AssetExecutionContext, dedup: DedupResource, embedder: EmbedderResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    started = time.perf_counter()
    stats = build_duplicate_groups(
        wh, policy=dedup.keeper_policy, priority_column=dedup.priority_column, log=context.log.info
    )
    if stats["removed_without_pair_to_keeper"]:
        raise RuntimeError(
            f"{stats['removed_without_pair_to_keeper']} removed image(s) have no pair with their keeper; this is a bug"
        )
    seconds = time.perf_counter() - started
    largest = wh.query(
        "SELECT group_id, group_size, group_min_similarity, group_diameter FROM duplicate_groups "
        "WHERE is_keeper ORDER BY group_size DESC, group_id LIMIT 10"
    )
    meta = {
        "dagster/row_count": stats["rows"],
        "groups": stats["groups"],
        "images_removed_as_duplicates": stats["rows"] - stats["groups"],
        "largest_group": stats["largest_group"],
        "policy": f"greedy keepers, no chaining (keeper rank: {dedup.keeper_policy})",
        "sql_rounds": stats["rounds"],
        "finished_in_numpy": stats["residual"],
        "seconds": round(seconds, 3),
        "largest_groups": table_preview(largest),
    }
    sizes = stats["sizes"]
    if sizes:
        meta["groups_by_size"] = counts_table({str(a): int(b) for a, b in sizes[:50]}, label="group_size")
        meta["group_size_histogram"] = warehouse.plot(
            bar_plot_png([str(a) for a, _ in sizes[:30]], [float(b) for _, b in sizes[:30]],
                         "duplicate group sizes", "members", "groups"),
            "group size histogram", "duplicate_groups_sizes",
        )
    review = write_review_page(wh, warehouse, dedup.edge_floor(embedder))
    if review is not None:
        meta["review_page"] = warehouse.link(review)
    return MaterializeResult(metadata=meta)


REVIEW_GROUPS = 500  # groups shown on the review page (largest, then loosest)

def write_review_page(wh: Warehouse, warehouse: WarehouseResource, tau: float) -> Path | None:
    """The static HTML page for looking through groups (written next to the warehouse): the
    REVIEW_GROUPS largest groups and the REVIEW_GROUPS loosest, so the page stays small; its slider
    starts at `tau` (the lowest similarity an edge can have). When an audit page is there, flagged members link to it (the audit rewrites
    this page after each audit, so the badges are current)."""

    groups = wh.query(
        "WITH shown AS (SELECT group_id FROM (SELECT group_id FROM duplicate_groups WHERE is_keeper "
        "ORDER BY group_size DESC, group_id LIMIT $n) UNION (SELECT group_id FROM duplicate_groups WHERE is_keeper "
        "ORDER BY group_min_similarity, group_id LIMIT $n)) "
        "SELECT d.* FROM duplicate_groups d JOIN shown USING (group_id) ORDER BY group_id, image_id",
        {"n": REVIEW_GROUPS},
    )
    if groups.height == 0:
        return None
    locs = wh.query(
        "SELECT i.image_id, i.location FROM image_index i JOIN duplicate_groups g USING (image_id)"
    ).join(groups.select("image_id"), on="image_id", how="semi")
    locations = dict(zip(locs["image_id"].to_list(), locs["location"].to_list()))
    edges = wh.query(  # each shown member's pair with its keeper, as verified
        "SELECT d.image_id, v.verdict, v.inliers, CASE WHEN v.image_a = d.image_id THEN v.points_a ELSE v.points_b END AS pts "
        "FROM duplicate_groups d JOIN verified_pairs v ON v.image_a = least(d.image_id, d.group_id) "
        "AND v.image_b = greatest(d.image_id, d.group_id) WHERE NOT d.is_keeper"
    ).join(groups.select("image_id"), on="image_id", how="semi")
    verdicts = {i: (v, n, p) for i, v, n, p in edges.iter_rows()}
    audit = None
    if (warehouse.directory / AUDIT_PAGE).exists() and wh.table_exists("regurgitation_audit"):
        audit = wh.query(
            "SELECT generated, image_id, flagged FROM regurgitation_audit WHERE flagged AND list_contains($ids, image_id)",
            {"ids": groups["image_id"].to_list()},
        )
    return write_groups_review_html(groups, locations, warehouse.directory / GROUPS_PAGE, verdicts=verdicts,
                                    audit=audit, audit_page=AUDIT_PAGE if audit is not None else None, tau=tau)
