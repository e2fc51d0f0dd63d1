"""Dedup stage: five clusterings, candidate pairs (+ recall check), duplicate groups.

These assets read the embeddings of every shard (they are not partitioned) and run in the `gpu`
pool. The algorithms live in `dedup_assets.dedup`; this module reads, calls, writes, reports.
"""


import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from dedup_assets.dedup.groups import KeeperPolicy, build_groups
from dedup_assets.dedup.incremental import needs_refit, pairs_with_new
from dedup_assets.dedup.kernels import describe_backend
from dedup_assets.dedup.kmeans import Clustering, ClusteringConfig, assign, fit_clusterings
from dedup_assets.dedup.pairs import Pairs, pairs_within_clusters, union_pairs
from dedup_assets.dedup.recall import estimate_recall
from dedup_assets.defs.metadata import bar_plot_png, markdown_preview, png_markdown
from dedup_assets.defs.resources import EmbedderResource, WarehouseResource
from dedup_assets.tables import resolve_threshold
from dedup_assets.warehouse import Warehouse

GROUP = "dedup"


class DedupResource(ConfigurableResource):
    """Settings of the whole dedup chain (shared by the assets and the recall check)."""

    n_clusterings: int = Field(default=5, description="k-means clusterings, each on a different random subset.")
    k: int | None = Field(default=None, description="Clusters per clustering; None = rule by N (README).")
    subset_size: int | None = Field(default=None, description="Points per k-means fit; None = rule by N and K.")
    niter: int = Field(default=20)
    soft: bool = Field(default=True, description="Also join each image's second-nearest cluster (0.96 → 0.996 recall at 1M in the benchmark).")
    threshold: float | None = Field(
        default=None, description="Cosine τ for a duplicate pair; None = the embedder's calibrated value."
    )
    block_size: int = Field(default=4096, description="Rows per block in the pair search (memory bound).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto")
    keeper_policy: Literal["resolution", "centroid", "priority"] = Field(default="resolution")
    priority_column: str | None = Field(
        default=None, description="image_index column whose highest value wins (policy 'priority')."
    )
    split_below: float | None = Field(
        default=None, description="Anti-chaining: members below this similarity to the keeper leave the group."
    )
    recall_sample: int = Field(default=1000, description="Images sampled by the recall estimate.")
    recall_target: float = Field(default=0.95, description="The recall check warns below this.")
    seed: int = Field(default=0)
    incremental: bool = Field(
        default=True, description="Assign new images to the stored centroids instead of refitting."
    )
    refit_factor: float = Field(
        default=2.0, description="Refit anyway once the corpus exceeds this multiple of its size at the last fit."
    )

    def clustering_config(self) -> ClusteringConfig:
        return ClusteringConfig(
            n_clusterings=self.n_clusterings,
            k=self.k,
            subset_size=self.subset_size,
            niter=self.niter,
            soft=self.soft,
            seed=self.seed,
            device=self.device,
        )

    def tau(self, embedder: EmbedderResource) -> float:
        return resolve_threshold(self.threshold, embedder)


def load_vectors(wh: Warehouse) -> tuple[list[str], np.ndarray, str]:
    """All embeddings, ordered by image_id, and the single model id they come from."""
    models = wh.query("SELECT DISTINCT model FROM embeddings")["model"].to_list()
    if len(models) > 1:
        raise RuntimeError(
            f"the embeddings table mixes models {models}; re-embed every shard with one model first"
        )
    ids, x = wh.read_vectors("embeddings", "image_id", "embedding")
    return ids, x, (models[0] if models else "")


def load_pairs(wh: Warehouse, ids: list[str], drop_missing: bool = False) -> Pairs:
    """The candidate_pairs table as index pairs into `ids` (sorted)."""
    df = wh.read_table("candidate_pairs")
    pos = {s: n for n, s in enumerate(ids)}
    if drop_missing:  # images whose shard was removed or re-indexed away
        df = df.filter(pl.col("image_a").is_in(ids) & pl.col("image_b").is_in(ids))
    i = np.fromiter((pos[a] for a in df["image_a"].to_list()), dtype=np.int64, count=df.height)
    j = np.fromiter((pos[b] for b in df["image_b"].to_list()), dtype=np.int64, count=df.height)
    return Pairs(
        i=i,
        j=j,
        sim=df["similarity"].to_numpy().astype(np.float32),
        found_by=df["found_by"].to_numpy().astype(np.uint8),
        comparisons=0,
    )


def load_clusterings(wh: Warehouse, ids: list[str], n_clusterings: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    df = wh.read_table("clusterings")
    pos = {s: n for n, s in enumerate(ids)}
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for c in range(n_clusterings):
        part = df.filter(pl.col("clustering") == c)
        labels = np.full(len(ids), -1, dtype=np.int64)
        labels2 = np.full(len(ids), -1, dtype=np.int64)
        idx = np.fromiter((pos[s] for s in part["image_id"].to_list()), dtype=np.int64, count=part.height)
        labels[idx] = part["cluster"].to_numpy()
        has2 = part["cluster2"].is_not_null().any()
        if has2:
            labels2[idx] = part["cluster2"].fill_null(-1).to_numpy()
        if (labels < 0).any():
            raise RuntimeError(
                "clusterings do not cover every embedded image: re-materialize `clusterings` after "
                "embedding new shards"
            )
        out.append((labels, labels2 if has2 else None))
    return out


class ClusteringsConfig(Config):
    """Run config of `clusterings`: a full refit is an explicit action."""

    refit: bool = False


CLUSTERINGS_SCHEMA = {"image_id": pl.String, "clustering": pl.Int32, "cluster": pl.Int32, "cluster2": pl.Int32}


def _clustering_rows(ids: list[str], index: int, labels: np.ndarray, labels2: np.ndarray | None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": ids,
            "clustering": np.full(len(ids), index, dtype=np.int32),
            "cluster": labels.astype(np.int32),
            "cluster2": labels2.astype(np.int32) if labels2 is not None else None,
        },
        schema=CLUSTERINGS_SCHEMA,
    )


def _stored_fit(wh: Warehouse, model: str, dedup: DedupResource) -> pl.DataFrame | None:
    """The stored centroids when they can serve new vectors (same model, same number of clusterings)."""
    if not (wh.table_exists("clustering_centroids") and wh.table_exists("clusterings")):
        return None
    cents = wh.read_table("clustering_centroids", order_by="clustering, cluster")
    if cents.height == 0 or cents["model"][0] != model or cents["clustering"].n_unique() != dedup.n_clusterings:
        return None
    return cents


@asset(
    group_name=GROUP,
    deps=["embeddings"],
    pool="gpu",
    kinds={"duckdb", "faiss"},
    description=(
        "One row per (image, clustering): the k-means cluster of every embedded image in each of "
        "the clusterings, each fitted on a different random subset (cluster2 = second-nearest "
        "cluster when soft assignment is on). New images are assigned to the stored centroids "
        "until the corpus outgrows them (refit_factor) or a refit is asked for."
    ),
)
def clusterings(
    context: AssetExecutionContext, config: ClusteringsConfig, dedup: DedupResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    context.log.info(describe_backend(dedup.device))
    ids, x, model = load_vectors(wh)
    started = time.perf_counter()
    stored = None if config.refit or not dedup.incremental else _stored_fit(wh, model, dedup)
    n_at_fit = int(stored["n_at_fit"][0]) if stored is not None else 0
    if stored is not None and needs_refit(len(ids), n_at_fit, dedup.refit_factor):
        context.log.info(f"corpus grew from {n_at_fit} to {len(ids)} images (> {dedup.refit_factor}×): refitting")
        stored = None

    if stored is not None:
        mode = "incremental"
        old = wh.read_table("clusterings").filter(pl.col("image_id").is_in(ids))
        known = set(old["image_id"].unique().to_list())
        new_rows = [r for r, i in enumerate(ids) if i not in known]
        new_ids = [ids[r] for r in new_rows]
        frames = [old]
        centroids_by_c = {}
        for c in range(dedup.n_clusterings):
            part = stored.filter(pl.col("clustering") == c)
            centroids = np.ascontiguousarray(np.stack(part["centroid"].to_numpy()).astype(np.float32))
            centroids_by_c[c] = centroids
            labels, labels2 = assign(x[new_rows], centroids, soft=dedup.soft, device=dedup.device) if new_rows else (
                np.zeros(0, np.int32), np.zeros(0, np.int32) if dedup.soft else None)
            frames.append(_clustering_rows(new_ids, c, labels, labels2))
        df = pl.concat(frames).sort("clustering", "image_id")
        wh.replace_table("clusterings", df)
        fit_id = str(stored["fit_id"][0])
        k = int(stored.filter(pl.col("clustering") == 0).height)
        subset = int(stored["subset_size"][0])
        sizes = [
            np.bincount(df.filter(pl.col("clustering") == c)["cluster"].to_numpy(), minlength=centroids_by_c[c].shape[0])
            for c in range(dedup.n_clusterings)
        ]
        fit_s, assign_s = 0.0, time.perf_counter() - started
        context.log.info(f"assigned {len(new_ids)} new images to the stored centroids (fit {fit_id})")
    else:
        mode = "full"
        fitted: list[Clustering] = fit_clusterings(x, dedup.clustering_config(), log=context.log.info)
        fit_id = uuid.uuid4().hex[:12]
        df = (
            pl.concat([_clustering_rows(ids, c.index, c.labels, c.labels2) for c in fitted])
            if fitted else pl.DataFrame(schema=CLUSTERINGS_SCHEMA)
        )
        wh.replace_table("clusterings", df)
        if fitted:
            wh.replace_table(
                "clustering_centroids",
                pl.concat(
                    [
                        pl.DataFrame(
                            {
                                "clustering": np.full(c.k, c.index, dtype=np.int32),
                                "cluster": np.arange(c.k, dtype=np.int32),
                                "centroid": c.centroids.astype(np.float32),
                                "model": [model] * c.k,
                                "fit_id": [fit_id] * c.k,
                                "n_at_fit": np.full(c.k, len(ids), dtype=np.int64),
                                "subset_size": np.full(c.k, c.subset_size, dtype=np.int64),
                            },
                            schema={
                                "clustering": pl.Int32, "cluster": pl.Int32,
                                "centroid": pl.Array(pl.Float32, int(c.centroids.shape[1])),
                                "model": pl.String, "fit_id": pl.String, "n_at_fit": pl.Int64,
                                "subset_size": pl.Int64,
                            },
                        )
                        for c in fitted
                    ]
                ),
            )
        new_ids = ids
        k = fitted[0].k if fitted else 0
        subset = fitted[0].subset_size if fitted else 0
        sizes = [np.bincount(c.labels, minlength=c.k) for c in fitted]
        fit_s = sum(c.fit_seconds for c in fitted)
        assign_s = sum(c.assign_seconds for c in fitted)
    seconds = time.perf_counter() - started

    meta = {
        "dagster/row_count": df.height,
        "mode": mode,
        "fit_id": fit_id,
        "images": len(ids),
        "newly_assigned": len(new_ids),
        "model": model,
        "clusterings": dedup.n_clusterings,
        "K": k,
        "subset_size": subset,
        "fit_seconds": round(fit_s, 3),
        "assign_seconds": round(assign_s, 3),
        "seconds": round(seconds, 3),
        "empty_clusters": MetadataValue.json([int((sz == 0).sum()) for sz in sizes]),
        "largest_cluster": MetadataValue.json([int(sz.max()) if sz.size else 0 for sz in sizes]),
    }
    if len(ids) and sizes:
        hist_labels, hist_values = _size_histogram(sizes[0])
        meta["cluster_sizes_plot"] = png_markdown(
            bar_plot_png(hist_labels, hist_values, "cluster sizes (clustering 0)", "images per cluster", "clusters"),
            "cluster size distribution",
        )
    return MaterializeResult(metadata=meta)


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


@asset(
    group_name=GROUP,
    deps=["clusterings"],
    pool="gpu",
    kinds={"duckdb", "numpy"},
    description=(
        "One row per candidate duplicate pair (image_a < image_b) with cosine ≥ τ, found by an "
        "exact search inside shared clusters; found_by is a bitmask of the clusterings that found it."
    ),
)
def candidate_pairs(
    context: AssetExecutionContext,
    dedup: DedupResource,
    embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    wh = warehouse.get()
    context.log.info(describe_backend(dedup.device))
    ids, x, _ = load_vectors(wh)
    tau = dedup.tau(embedder)
    fit_id = str(wh.query("SELECT any_value(fit_id) AS f FROM clustering_centroids")["f"][0])
    labels_by_c = load_clusterings(wh, ids, dedup.n_clusterings)
    searched = (
        wh.read_table("candidate_pairs_searched")
        if wh.table_exists("candidate_pairs_searched") and wh.table_exists("candidate_pairs") else None
    )
    incremental = (
        searched is not None and searched.height > 0
        and set(searched["fit_id"].to_list()) == {fit_id} and searched["threshold"][0] == tau
    )
    started = time.perf_counter()
    per: list[Pairs] = []
    if incremental:
        known = set(searched["image_id"].to_list())
        is_new = np.fromiter((i not in known for i in ids), dtype=bool, count=len(ids))
        old = load_pairs(wh, ids, drop_missing=True)
        context.log.info(f"incremental search: {int(is_new.sum())} new images against {len(ids)} (fit {fit_id})")
    for c, (labels, labels2) in enumerate(labels_by_c):
        t0 = time.perf_counter()
        if incremental:
            p = pairs_with_new(x, labels, labels2, is_new, tau, block_size=dedup.block_size, clustering_index=c)
        else:
            p = pairs_within_clusters(
                x, labels, labels2, threshold=tau, block_size=dedup.block_size, device=dedup.device,
                clustering_index=c,
            )
        per.append(p)
        context.log.info(
            f"clustering {c}: {len(p)} pairs, {p.comparisons} comparisons in {time.perf_counter() - t0:.2f}s"
        )
    union = union_pairs(per) if per else Pairs.empty()
    new_pairs = len(union)
    if incremental:
        union = union_pairs([old, union])
    ids_arr = np.array(ids, dtype=object)
    df = pl.DataFrame(
        {
            "image_a": ids_arr[union.i].tolist() if len(union) else [],
            "image_b": ids_arr[union.j].tolist() if len(union) else [],
            "similarity": union.sim.astype(np.float32),
            "found_by": union.found_by.astype(np.uint8),
        },
        schema={"image_a": pl.String, "image_b": pl.String, "similarity": pl.Float32, "found_by": pl.UInt8},
    ).sort("image_a", "image_b")
    wh.replace_table("candidate_pairs", df)
    wh.replace_table(
        "candidate_pairs_searched",
        pl.DataFrame({"image_id": ids, "fit_id": [fit_id] * len(ids), "threshold": [tau] * len(ids)},
                     schema={"image_id": pl.String, "fit_id": pl.String, "threshold": pl.Float64}),
    )
    seconds = time.perf_counter() - started

    cumulative = []
    mask = 0
    for c in range(len(per)):
        mask |= 1 << c
        cumulative.append(int(((union.found_by & mask) != 0).sum()))
    gains = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])] if cumulative else []
    comparisons = sum(p.comparisons for p in per)
    n = len(ids)
    all_pairs = n * (n - 1) // 2
    return MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "mode": "incremental" if incremental else "full",
            "new_pairs": new_pairs,
            "threshold": tau,
            "pairs_per_clustering": MetadataValue.json([len(p) for p in per]),
            "marginal_gain_per_added_clustering": MetadataValue.json(gains),
            "comparisons": int(comparisons),
            "all_pairs_n2_over_2": all_pairs,
            "comparison_fraction": round(comparisons / all_pairs, 6) if all_pairs else 0.0,
            "seconds": round(seconds, 3),
            "preview": markdown_preview(df.sort("similarity", descending=True)),
        }
    )


@asset_check(
    asset=candidate_pairs,
    description=(
        "Recall estimate: samples images, finds their exact neighbours over all vectors, and warns "
        "when the fraction present in candidate_pairs is below the target."
    ),
)
def candidate_pairs_recall(
    context: AssetCheckExecutionContext,
    dedup: DedupResource,
    embedder: EmbedderResource,
    warehouse: WarehouseResource,
) -> AssetCheckResult:
    wh = warehouse.get()
    ids, x, _ = load_vectors(wh)
    pairs = load_pairs(wh, ids)
    tau = dedup.tau(embedder)
    est = estimate_recall(x, pairs, tau, dedup.n_clusterings, sample_size=dedup.recall_sample, seed=dedup.seed)
    curve = {str(c + 1): round(r, 4) for c, r in enumerate(est.by_n_clusterings)}
    return AssetCheckResult(
        passed=est.recall >= dedup.recall_target,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "recall": round(est.recall, 4),
            "ci_95": MetadataValue.json([round(est.ci_low, 4), round(est.ci_high, 4)]),
            "target": dedup.recall_target,
            "sampled_images": est.n_sampled,
            "true_pairs_of_sample": est.n_true_pairs,
            "found": est.n_found,
            "recall_by_number_of_clusterings": MetadataValue.json(curve),
            "threshold": tau,
        },
    )


@asset(
    group_name=GROUP,
    deps=["candidate_pairs", "image_index"],
    pool="gpu",
    kinds={"duckdb", "python"},
    description=(
        "One row per image that belongs to a duplicate group of two or more: group_id, whether it "
        "is the group's keeper, its similarity to the keeper, and the group's size and tightness."
    ),
)
def duplicate_groups(
    context: AssetExecutionContext, dedup: DedupResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    ids, x, _ = load_vectors(wh)
    pairs = load_pairs(wh, ids)
    extra = [dedup.priority_column] if dedup.keeper_policy == "priority" and dedup.priority_column else []
    info = (
        wh.read_table("image_index", columns=["image_id", "width", "height", "bytes", *extra])
        .join(pl.DataFrame({"image_id": ids}), on="image_id", how="right")
        .select("image_id", "width", "height", "bytes", *extra)
    )
    started = time.perf_counter()
    groups = build_groups(
        x,
        pairs,
        ids,
        policy=KeeperPolicy(name=dedup.keeper_policy),
        width=info["width"].fill_null(0).to_numpy(),
        height=info["height"].fill_null(0).to_numpy(),
        file_bytes=info["bytes"].fill_null(0).to_numpy(),
        priority=info[dedup.priority_column].to_numpy() if extra else None,
        split_below=dedup.split_below,
    )
    wh.replace_table("duplicate_groups", groups)
    seconds = time.perf_counter() - started
    n_groups = groups.filter(pl.col("is_keeper")).height
    sizes = groups.filter(pl.col("is_keeper"))["group_size"].to_numpy() if n_groups else np.zeros(0)
    meta = {
        "dagster/row_count": groups.height,
        "groups": n_groups,
        "images_removed_as_duplicates": groups.height - n_groups,
        "largest_group": int(sizes.max()) if sizes.size else 0,
        "seconds": round(seconds, 3),
        "largest_groups": markdown_preview(
            groups.filter(pl.col("is_keeper")).sort("group_size", descending=True).select(
                "group_id", "group_size", "group_min_similarity", "group_diameter"
            )
        ),
    }
    if sizes.size:
        vals, counts = np.unique(sizes, return_counts=True)
        meta["group_size_histogram"] = png_markdown(
            bar_plot_png([str(v) for v in vals[:30]], counts[:30].astype(float).tolist(), "duplicate group sizes", "members", "groups"),
            "group size histogram",
        )
    review = _write_review(wh, groups, warehouse)
    if review is not None:
        meta["review_page"] = MetadataValue.path(str(review))
    return MaterializeResult(metadata=meta)


def _write_review(wh: Warehouse, groups: pl.DataFrame, warehouse: WarehouseResource) -> Path | None:
    """The static HTML page for looking through groups (written next to the warehouse)."""
    from dedup_assets.audit.report import write_groups_review_html

    if groups.height == 0:
        return None
    locs = wh.query(
        "SELECT i.image_id, i.location FROM image_index i JOIN duplicate_groups g USING (image_id)"
    )
    locations = dict(zip(locs["image_id"].to_list(), locs["location"].to_list()))
    return write_groups_review_html(groups, locations, warehouse.directory / "duplicate_groups.html")
