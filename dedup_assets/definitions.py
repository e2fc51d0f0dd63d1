"""The Dagster code location: every asset, check, resource, sensor, schedule and job.

Settings come from the environment (see `dedup_assets.settings` and the README), so the UI
(`dagster dev`), sensor-launched runs and `dedup-assets run` all see the same data.
"""


import subprocess
from pathlib import Path

from dagster import (
    AnchorBasedFilePathMapping,
    AssetSelection,
    AssetSpec,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
    link_code_references_to_git,
    map_asset_specs,
    with_source_code_references,
)
from dagster_celery import celery_executor

from dedup_assets.defs.audit import AuditResource, no_regurgitation, regurgitation_audit
from dedup_assets.defs.curate import CurateResource, filtered_dataset, filtered_dataset_accounting
from dedup_assets.defs.dedup import (
    DedupResource,
    candidate_pairs,
    candidate_pairs_recall,
    clusterings,
    duplicate_groups,
    verified_pairs,
)
from dedup_assets.defs.embed import embeddings, embeddings_unit_norm_one_model
from dedup_assets.defs.filters import (
    ClassifierResource,
    PrefilterResource,
    filter_classifiers,
    label_sensor,
    prefilter,
)
from dedup_assets.defs.ingest import (
    discover_shards_job,
    discovery_schedule,
    image_index,
    image_index_ids_unique,
    shard_job,
    shard_sensor,
)
from dedup_assets.defs.partitions import label_sets_partitions, shards_partitions
from dedup_assets.defs.resources import resources_from_settings
from dedup_assets.settings import Settings

PER_SHARD_ASSETS = [image_index, prefilter, embeddings]
# one partition per label set (a Dagster job holds assets of one partitioning, so they have their own job)
LABEL_SET_ASSETS = [filter_classifiers]
CORPUS_ASSETS = [clusterings, candidate_pairs, verified_pairs, duplicate_groups, filtered_dataset, regurgitation_audit]
ALL_ASSETS = [*PER_SHARD_ASSETS, *LABEL_SET_ASSETS, *CORPUS_ASSETS]
ALL_CHECKS = [
    image_index_ids_unique,
    embeddings_unit_norm_one_model,
    candidate_pairs_recall,
    filtered_dataset_accounting,
    no_regurgitation,
]

# Who to ask about an asset (the catalog's owners); a deployment replaces it with its own team.
OWNERS = ["team:data-curation"]


def _git_source() -> tuple[str, str] | None:
    """(browsable URL of the repository, branch) when this package runs from a git checkout with a
    remote named origin; None otherwise (code references then point at the local files)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        url, branch = git("config", "--get", "remote.origin.url"), git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if url.startswith("git@") and ":" in url:  # git@github.com:owner/repo.git → https://github.com/owner/repo
        host, _, path = url[4:].partition(":")
        url = f"https://{host}/{path}"
    url = url.removesuffix(".git")
    if not url.startswith(("https://", "http://")):
        return None
    return url, (branch if branch and branch != "HEAD" else "main")


def _what_runs(settings: Settings) -> dict[str, set[str]]:
    """The kinds the catalog shows where they depend on the configuration: the embedder (PyTorch only
    for open_clip) and the k-means backend (faiss on the CPU, PyTorch on a GPU)."""
    from dedup_assets.dedup.kernels import _has_gpu_node

    torch_embeds = settings.embedder == "openclip" and not settings.embeddings
    gpu = settings.device == "cuda" or (settings.device == "auto" and _has_gpu_node())
    return {
        "embeddings": {"parquet", "pytorch" if torch_embeds else "numpy"},
        "clusterings": {"duckdb", "pytorch" if gpu else "faiss"},
    }


def catalog_assets(settings: Settings, git_source: tuple[str, str] | None = None) -> list:
    """ALL_ASSETS as the catalog shows them: owners, tags (stage = group, scale = per-shard or corpus),
    the kinds that really run under `settings`, and references to their source — linked to the git
    repository when it has a remote (`git_source`, default: found with git)."""
    kinds = _what_runs(settings)

    def describe(spec: AssetSpec) -> AssetSpec:
        tags = {k: v for k, v in spec.tags.items() if not k.startswith("dagster/kind/")}
        scale = {"shards": "per-shard", "label_sets": "per-label-set"}.get(
            getattr(spec.partitions_def, "name", None) or "", "corpus")
        tags.update(stage=spec.group_name or "default", scale=scale)
        return spec.replace_attributes(
            owners=OWNERS, tags=tags, kinds=kinds.get(spec.key.to_user_string(), set(spec.kinds))
        )

    assets = with_source_code_references(map_asset_specs(describe, ALL_ASSETS))
    source = git_source if git_source is not None else _git_source()
    if source:
        assets = link_code_references_to_git(
            assets, git_url=source[0], git_branch=source[1],
            file_path_mapping=AnchorBasedFilePathMapping(
                local_file_anchor=Path(__file__), file_anchor_path_in_repository="dedup_assets/definitions.py"
            ),
        )
    return list(assets)


corpus_job = define_asset_job(
    "corpus_job",
    selection=AssetSelection.assets(*CORPUS_ASSETS),
    description="Cluster, find pairs, group, filter, reweight and audit over every shard.",
)

classifier_job = define_asset_job(
    "classifier_job",
    selection=AssetSelection.assets(*LABEL_SET_ASSETS),
    partitions_def=label_sets_partitions,
    description="Train one label set's filter classifier, score every image, queue the next images to label.",
)


# Scale-out: the same assets with every step sent to Celery workers, which may run on other machines
# (README "Scale-out"). Broker and backend come from run config (execution.config.broker/backend).
shard_job_celery = define_asset_job(
    "shard_job_celery",
    selection=AssetSelection.assets(*PER_SHARD_ASSETS),
    partitions_def=shards_partitions,
    executor_def=celery_executor,
    description="shard_job with its steps executed by Celery workers.",
)
corpus_job_celery = define_asset_job(
    "corpus_job_celery",
    selection=AssetSelection.assets(*CORPUS_ASSETS),
    executor_def=celery_executor,
    description="corpus_job with its steps executed by Celery workers.",
)


def build_resources(settings: Settings) -> dict:
    resources = resources_from_settings(settings)
    resources.update(
        dedup=DedupResource(),
        prefilters=PrefilterResource(min_side=settings.min_side),
        curate=CurateResource(min_clip_score=settings.min_clip_score),
        audit=AuditResource(),
        classifiers=ClassifierResource(),
    )
    return resources


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or Settings.from_env()
    return Definitions(
        assets=catalog_assets(settings),
        asset_checks=ALL_CHECKS,
        jobs=[shard_job, corpus_job, classifier_job, discover_shards_job, shard_job_celery, corpus_job_celery],
        sensors=[shard_sensor, label_sensor],
        schedules=[
            discovery_schedule(settings.discovery_cron),
            ScheduleDefinition(
                name="corpus_schedule",
                job=corpus_job,
                cron_schedule=settings.corpus_cron,
                description="Refreshes dedup, the filtered set and the audit over all shards.",
            ),
        ],
        resources=build_resources(settings),
    )


defs = build_definitions()
