"""Audit stage: `regurgitation_audit` (the nearest training images of a model's generated images,
exact top-k streamed over the embedding store, optionally verified) and its check."""


import time
from pathlib import Path
from typing import Literal

import polars as pl
from dagster import (
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

from dedup_assets import tables
from dedup_assets.audit.page import AUDIT_PAGE, best_matches, write_audit_html
from dedup_assets.audit.search import AUDIT_SCHEMA, AuditConfig, StreamedTopK, apply_verdicts, audit_table, discover_generated
from dedup_assets.dedup.kernels import describe_backend, resolve_device
from dedup_assets.dedup.review_page import GROUPS_PAGE
from dedup_assets.defs.dedup import DedupResource, verify_image, write_review_page
from dedup_assets.defs.metadata import table_preview
from dedup_assets.defs.resources import DatasetResource, EmbedderResource, WarehouseResource
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.ingest.clip_retrieval import read_generated
from dedup_assets.tables import ensure_embeddings, resolve_threshold

GROUP = "audit"


class AuditResource(ConfigurableResource):
    """How the regurgitation audit searches and what it flags."""

    top_k: int = Field(default=5, description="Nearest training images kept per generated image.")
    threshold: float | None = Field(
        default=None,
        description="Cosine at/above which a generated image is flagged; None = the run's --threshold, else the "
        "embedder's calibration.",
    )
    batch_rows: int = Field(
        default=65_536, description="Training vectors read from the embedding store per batch of the search."
    )
    verify: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Geometric verification of the audit's neighbours (dedup.verify): 'auto' = on for the offline "
        "embedder with generated image files; off for generated vectors (no images).",
    )
    notion: Literal["copy", "near_duplicate"] = Field(
        default="copy",
        description="What the audit's verification accepts: 'copy' (the default) = the generated image is a training "
        "picture after edits, so a flag names the picture it reproduces; 'near_duplicate' also flags one layout "
        "with other details (every clock of a common design).",
    )
    verify_margin: float = Field(
        default=0.1, description="With verification, neighbours down to τ minus this (cosine units) are verified."
    )


@asset(
    group_name=GROUP,
    metadata={"dagster/column_schema": tables.column_schema("regurgitation_audit")},
    deps=["embeddings", "filtered_dataset"],
    pool="gpu",
    kinds={"duckdb", "parquet"},
    description=(
        "One row per (generated image, rank): its nearest training images (exact top-k streamed over "
        "the embedding store) over the whole indexed set before deduplication, whether each is a near-copy (flagged), and whether it survived "
        "into filtered_dataset."
    ),
)
def regurgitation_audit(
    context: AssetExecutionContext,
    dataset: DatasetResource,
    embedder: EmbedderResource,
    audit: AuditResource,
    dedup: DedupResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    wh = warehouse.get()
    if not dataset.generated and not dataset.generated_embeddings:
        wh.replace_table("regurgitation_audit", pl.DataFrame(schema=AUDIT_SCHEMA))
        stale = warehouse.directory / AUDIT_PAGE
        stale.unlink(missing_ok=True)  # a page of an earlier audit must not sit beside an empty table
        _refresh_groups_page(wh, warehouse, dedup, embedder)  # and no badge may link to it
        context.log.warning(
            "nothing to audit: no generated images or vectors configured (--generated / --generated-embeddings / "
            "DEDUP_ASSETS_GENERATED); the no_regurgitation check will warn instead of passing"
        )
        return MaterializeResult(
            metadata={"dagster/row_count": 0, "note": "nothing audited: no generated images or vectors configured"}
        )
    model_id = embedder.recorded_model_id()
    store = ensure_embeddings(wh)
    train_models = sorted(set(store.partition_models().values()))
    if len(train_models) > 1:
        raise RuntimeError(
            f"the training embeddings mix models {train_models}; re-embed every shard with one model first"
        )
    if train_models and train_models[0] != model_id:
        raise RuntimeError(
            f"the training set was embedded with {train_models[0]!r} but the audit embedder is "
            f"{model_id!r}: similarities across models are meaningless. Use the same embedder "
            f"for both (or re-embed the training set)."
        )
    started = time.perf_counter()
    gen_paths: dict[str, Path] = {}
    if dataset.generated_embeddings:  # vectors made elsewhere, same layout as --embeddings
        gen_ids, gen_prompts, gen_x, left_out = read_generated(dataset.generated_embeddings, dataset.batch_rows)
        for gid, reason in left_out:
            context.log.warning(f"generated vector {gid} left out of the audit: {reason}")
    else:
        emb = embedder.get()
        gen = discover_generated(Path(dataset.generated))
        result = embed_stream(
            emb,
            ((gid, path.read_bytes()) for gid, path, _ in gen),
            batch_size=embedder.batch_size,
            workers=0,
        )
        left_out = [(gid, reason) for gid, reason, _ in result.failures]
        for gid, reason, err in result.failures:
            context.log.warning(f"generated image {gid} could not be decoded ({reason}): {err}")
        prompts = {gid: prompt for gid, _, prompt in gen}
        gen_ids, gen_x = result.ids, result.vectors
        gen_prompts = [prompts.get(g) for g in gen_ids]
        gen_paths = {gid: path for gid, path, _ in gen}
    tau = resolve_threshold(audit.threshold, embedder)
    cfg = AuditConfig(
        top_k=audit.top_k, threshold=tau, batch_rows=audit.batch_rows,
        device=resolve_device(embedder.device),
    )
    total = store.count()
    context.log.info(describe_backend(cfg.device))
    context.log.info(
        f"audit: exact top-{cfg.top_k} of {len(gen_ids)} generated vectors over {total} training vectors "
        f"on {cfg.device}, {cfg.batch_rows} per batch"
    )
    search = StreamedTopK(gen_x, cfg.top_k, cfg.device)
    last_log = time.perf_counter()
    for _, ids, x in store.iter_batches(batch_rows=cfg.batch_rows):
        search.add(ids, x)
        if time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            rate = search.top.searched / max(1e-9, last_log - started)
            context.log.info(f"audit: {search.top.searched}/{total} training vectors searched ({rate:,.0f}/s)")
    top = search.top
    found = sorted({str(t) for t in top.ids[top.filled()]})
    # Only the neighbours found are looked up: no step holds every kept id or every location.
    kept_ids = wh.query(
        "SELECT image_id FROM filtered_dataset WHERE list_contains($ids, image_id)", {"ids": found}
    )["image_id"].to_list()
    table = audit_table(gen_ids, gen_prompts, top, kept_ids, tau)
    locs = wh.read_table(
        "image_index", columns=["image_id", "location"], where="list_contains($ids, image_id)", params={"ids": found}
    )
    verify_note = "off"
    verifying = audit.verify == "on" or (
        audit.verify == "auto" and embedder.kind == "offline" and bool(gen_paths)
    )
    if verifying and not gen_paths:
        raise ValueError("audit_verify='on' needs generated image files (--generated), not vectors")
    if verifying:
        verdicts, verify_note = _verify_audit(table, gen_paths, dict(zip(locs["image_id"].to_list(),
                                              locs["location"].to_list())), audit, tau, context.log.info)
        table = apply_verdicts(table, verdicts, tau)
    wh.replace_table("regurgitation_audit", table)
    has_groups = (warehouse.directory / GROUPS_PAGE).exists()
    html = write_audit_html(
        table,
        gen_paths,
        dict(zip(locs["image_id"].to_list(), locs["location"].to_list())),
        warehouse.directory / AUDIT_PAGE,
        groups_page=GROUPS_PAGE if has_groups else None,
    )
    groups_page = _refresh_groups_page(wh, warehouse, dedup, embedder)
    flagged = table.filter(pl.col("flagged"))
    seconds = time.perf_counter() - started
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "generated_images": len(gen_ids),
            "undecodable_generated": len(left_out),
            "generated_source": MetadataValue.text(
                f"vectors under {dataset.generated_embeddings}" if dataset.generated_embeddings
                else f"images under {dataset.generated}"),
            "flagged_generated": flagged["generated"].n_unique(),
            "threshold": tau,
            "verification": verify_note,
            "training_vectors_searched": top.searched,
            "search": MetadataValue.text(
                f"exact streamed top-{cfg.top_k} on {cfg.device}, {cfg.batch_rows} vectors per batch"
            ),
            "seconds": round(seconds, 3),
            "training_vectors_per_second": round(top.searched / max(seconds, 1e-9)),
            "best_matches": table_preview(best_matches(table), limit=20),
            "html_report": warehouse.link(html),
            **({"groups_page": warehouse.link(groups_page)} if groups_page is not None else {}),
        }
    )


def _refresh_groups_page(wh, warehouse: WarehouseResource, dedup: DedupResource,  # noqa: ANN001
                         embedder: EmbedderResource) -> Path | None:
    """Rewrite the duplicate-groups page so its badges (members a generated image matched) and its
    link to the audit page follow this audit."""
    if not wh.table_exists("duplicate_groups"):
        return None
    return write_review_page(wh, warehouse, dedup.edge_floor(embedder))


def _verify_audit(table: pl.DataFrame, gen_paths: dict, locations: dict, audit: AuditResource, tau: float,
                  log) -> tuple[dict[tuple[str, str], str], str]:  # noqa: ANN001
    """Verdicts for the audit rows within audit_verify_margin of τ (generated image vs training image)."""
    from dedup_assets.dedup.verify import VerifyConfig, verify_candidates

    lo = tau - audit.verify_margin
    rows = table.filter(pl.col("similarity") >= lo)
    cfg = VerifyConfig(notion=audit.notion)

    def load(key: str):  # noqa: ANN202
        kind, _, ref = key.partition(":")
        return verify_image(Path(ref).read_bytes() if kind == "gen" else None, ref)

    pairs = pl.DataFrame({
        "image_a": rows["generated"], "image_b": rows["image_id"], "similarity": rows["similarity"],
        "found_by": pl.Series([0] * rows.height, dtype=pl.UInt8),
        "location_a": [f"gen:{gen_paths[g]}" if g in gen_paths else None for g in rows["generated"].to_list()],
        "location_b": [f"train:{locations[t]}" if t in locations else None for t in rows["image_id"].to_list()],
    })
    df, st = verify_candidates(pairs, load, cfg, tau)
    log(f"audit verification ({audit.notion}): {st.pairs} pairs ≥ {lo:.3f}, {st.accepted} accepted, "
        f"{st.undecided} undecided, rejected {st.rejected}, {st.seconds:.1f}s")
    verdicts = dict(zip(zip(df["image_a"].to_list(), df["image_b"].to_list()), df["verdict"].to_list()))
    return verdicts, f"{audit.notion}: {st.pairs} pairs ≥ {lo:.3f} verified, {st.accepted} accepted"


@asset_check(
    asset=regurgitation_audit,
    description=(
        "Fails when any generated image is a near-copy of a training image, listing them; warns (never passes) when "
        "nothing was audited. The demo's generated folder holds planted copies, so after `make demo` this check is "
        "red by design."
    ),
)
def no_regurgitation(warehouse: WarehouseResource) -> AssetCheckResult:
    wh = warehouse.get()
    audited = int(wh.query("SELECT count(DISTINCT generated) AS n FROM regurgitation_audit")["n"][0])
    if audited == 0:
        return AssetCheckResult(
            passed=False,
            severity=AssetCheckSeverity.WARN,
            description="nothing was audited: configure generated images (--generated, DEDUP_ASSETS_GENERATED) or vectors",
            metadata={"generated_images_audited": 0},
        )
    flagged = wh.query(
        "SELECT generated, image_id, similarity, kept_in_filtered FROM regurgitation_audit "
        "WHERE flagged ORDER BY similarity DESC"
    )
    return AssetCheckResult(
        passed=flagged.height == 0,
        metadata={
            "generated_images_audited": audited,
            "flagged_pairs": flagged.height,
            "near_copies": table_preview(flagged, limit=50),
        },
    )
