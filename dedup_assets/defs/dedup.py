"""Dedup stage: five clusterings, candidate pairs (+ recall check), duplicate groups.

These assets read the embeddings of every shard (they are not partitioned) and run in the `gpu`
pool. The algorithms live in `dedup_assets.dedup`; this module reads, calls, writes, reports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from dedup_assets.dedup.groups import KeeperPolicy, build_groups
from dedup_assets.dedup.kmeans import Clustering, ClusteringConfig, fit_clusterings
from dedup_assets.dedup.pairs import Pairs, pairs_within_clusters, union_pairs
from dedup_assets.dedup.recall import estimate_recall
from dedup_assets.defs.metadata import bar_plot_png, markdown_preview, png_markdown
from dedup_assets.defs.resources import EmbedderResource, WarehouseResource
from dedup_assets.warehouse import Warehouse

GROUP = "dedup"


class DedupResource(ConfigurableResource):
    """Settings of the whole dedup chain (shared by the assets and the recall check)."""

    n_clusterings: int = Field(default=5, description="k-means clusterings, each on a different random subset.")
    k: int | None = Field(default=None, description="Clusters per clustering; None = rule by N (README).")
    subset_size: int | None = Field(default=None, description="Points per k-means fit; None = rule by N and K.")
    niter: int = Field(default=20)
    soft: bool = Field(default=False, description="Also join each image's second-nearest cluster.")
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
        return float(self.threshold if self.threshold is not None else embedder.duplicate_threshold())


def load_vectors(wh: Warehouse) -> tuple[list[str], np.ndarray, str]:
    """All embeddings, ordered by image_id, and the single model id they come from."""
    models = wh.query("SELECT DISTINCT model FROM embeddings")["model"].to_list()
    if len(models) > 1:
        raise RuntimeError(
            f"the embeddings table mixes models {models}; re-embed every shard with one model first"
        )
    ids, x = wh.read_vectors("embeddings", "image_id", "embedding")
    return ids, x, (models[0] if models else "")


def load_pairs(wh: Warehouse, ids: list[str]) -> Pairs:
    """The candidate_pairs table as index pairs into `ids` (sorted)."""
    df = wh.read_table("candidate_pairs")
    pos = {s: n for n, s in enumerate(ids)}
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


@asset(
    group_name=GROUP,
    deps=["embeddings"],
    pool="gpu",
    kinds={"duckdb", "faiss"},
    description=(
        "One row per (image, clustering): the k-means cluster of every embedded image in each of "
        "the clusterings, each fitted on a different random subset (cluster2 = second-nearest "
        "cluster when soft assignment is on)."
    ),
)
def clusterings(
    context: AssetExecutionContext, dedup: DedupResource, warehouse: WarehouseResource
) -> MaterializeResult:
    wh = warehouse.get()
    ids, x, model = load_vectors(wh)
    started = time.perf_counter()
    fitted: list[Clustering] = fit_clusterings(x, dedup.clustering_config(), log=context.log.info)
    frames = []
    centroid_frames = []
    for c in fitted:
        frames.append(
            pl.DataFrame(
                {
                    "image_id": ids,
                    "clustering": np.full(len(ids), c.index, dtype=np.int32),
                    "cluster": c.labels.astype(np.int32),
                    "cluster2": c.labels2.astype(np.int32) if c.labels2 is not None else None,
                },
                schema={"image_id": pl.String, "clustering": pl.Int32, "cluster": pl.Int32, "cluster2": pl.Int32},
            )
        )
        centroid_frames.append(
            pl.DataFrame(
                {
                    "clustering": np.full(c.k, c.index, dtype=np.int32),
                    "cluster": np.arange(c.k, dtype=np.int32),
                    "centroid": c.centroids.astype(np.float32),
                    "model": [model] * c.k,
                },
                schema={
                    "clustering": pl.Int32,
                    "cluster": pl.Int32,
                    "centroid": pl.Array(pl.Float32, int(c.centroids.shape[1])),
                    "model": pl.String,
                },
            )
        )
    df = pl.concat(frames) if frames else pl.DataFrame(
        schema={"image_id": pl.String, "clustering": pl.Int32, "cluster": pl.Int32, "cluster2": pl.Int32}
    )
    wh.replace_table("clusterings", df)
    if centroid_frames:
        wh.replace_table("clustering_centroids", pl.concat(centroid_frames))
    seconds = time.perf_counter() - started

    sizes = [np.bincount(c.labels, minlength=c.k) for c in fitted]
    first = sizes[0] if sizes else np.zeros(0, dtype=np.int64)
    hist_labels, hist_values = _size_histogram(first)
    meta = {
        "dagster/row_count": df.height,
        "images": len(ids),
        "model": model,
        "clusterings": len(fitted),
        "K": fitted[0].k if fitted else 0,
        "subset_size": fitted[0].subset_size if fitted else 0,
        "fit_seconds": round(sum(c.fit_seconds for c in fitted), 3),
        "assign_seconds": round(sum(c.assign_seconds for c in fitted), 3),
        "seconds": round(seconds, 3),
        "empty_clusters": MetadataValue.json([int((s == 0).sum()) for s in sizes]),
        "largest_cluster": MetadataValue.json([int(s.max()) if s.size else 0 for s in sizes]),
    }
    if len(ids):
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
    ids, x, _ = load_vectors(wh)
    tau = dedup.tau(embedder)
    started = time.perf_counter()
    per: list[Pairs] = []
    for c, (labels, labels2) in enumerate(load_clusterings(wh, ids, dedup.n_clusterings)):
        t0 = time.perf_counter()
        p = pairs_within_clusters(
            x, labels, labels2, threshold=tau, block_size=dedup.block_size, device=dedup.device, clustering_index=c
        )
        per.append(p)
        context.log.info(
            f"clustering {c}: {len(p.i)} pairs, {p.comparisons} comparisons in {time.perf_counter() - t0:.2f}s"
        )
    union = union_pairs(per) if per else Pairs(
        i=np.zeros(0, np.int64), j=np.zeros(0, np.int64), sim=np.zeros(0, np.float32),
        found_by=np.zeros(0, np.uint8), comparisons=0,
    )
    ids_arr = np.array(ids, dtype=object)
    df = pl.DataFrame(
        {
            "image_a": ids_arr[union.i].tolist() if len(union.i) else [],
            "image_b": ids_arr[union.j].tolist() if len(union.j) else [],
            "similarity": union.sim.astype(np.float32),
            "found_by": union.found_by.astype(np.uint8),
        },
        schema={"image_a": pl.String, "image_b": pl.String, "similarity": pl.Float32, "found_by": pl.UInt8},
    ).sort("image_a", "image_b")
    wh.replace_table("candidate_pairs", df)
    seconds = time.perf_counter() - started

    cumulative = []
    mask = 0
    for c in range(len(per)):
        mask |= 1 << c
        cumulative.append(int(((union.found_by & mask) != 0).sum()))
    gains = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])] if cumulative else []
    n = len(ids)
    all_pairs = n * (n - 1) // 2
    return MaterializeResult(
        metadata={
            "dagster/row_count": df.height,
            "threshold": tau,
            "pairs_per_clustering": MetadataValue.json([len(p.i) for p in per]),
            "marginal_gain_per_added_clustering": MetadataValue.json(gains),
            "comparisons": int(union.comparisons),
            "all_pairs_n2_over_2": all_pairs,
            "comparison_fraction": round(union.comparisons / all_pairs, 6) if all_pairs else 0.0,
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
