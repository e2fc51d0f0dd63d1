"""The Dagster code location: every asset, check, resource, sensor, schedule and job.

Settings come from the environment (see `dedup_assets.settings` and the README), so the UI
(`dagster dev`), sensor-launched runs and `dedup-assets run` all see the same data.
"""


from dagster import AssetSelection, Definitions, ScheduleDefinition, define_asset_job
from dagster_celery import celery_executor

from dedup_assets.defs.curate import (
    CurateResource,
    filtered_dataset,
    filtered_dataset_accounting,
    no_regurgitation,
    regurgitation_audit,
)
from dedup_assets.defs.dedup import (
    DedupResource,
    candidate_pairs,
    candidate_pairs_recall,
    clusterings,
    duplicate_groups,
    verified_pairs,
)
from dedup_assets.defs.embed import embeddings, embeddings_unit_norm_one_model
from dedup_assets.defs.filters import PrefilterResource, prefilter
from dedup_assets.defs.ingest import (
    discover_shards_job,
    discovery_schedule,
    image_index,
    image_index_ids_unique,
    shard_job,
    shard_sensor,
)
from dedup_assets.defs.partitions import shards_partitions
from dedup_assets.defs.resources import resources_from_settings
from dedup_assets.settings import Settings

PER_SHARD_ASSETS = [image_index, prefilter, embeddings]
CORPUS_ASSETS = [clusterings, candidate_pairs, verified_pairs, duplicate_groups, filtered_dataset, regurgitation_audit]
ALL_ASSETS = [*PER_SHARD_ASSETS, *CORPUS_ASSETS]
ALL_CHECKS = [
    image_index_ids_unique,
    embeddings_unit_norm_one_model,
    candidate_pairs_recall,
    filtered_dataset_accounting,
    no_regurgitation,
]

corpus_job = define_asset_job(
    "corpus_job",
    selection=AssetSelection.assets(*CORPUS_ASSETS),
    description="Cluster, find pairs, group, filter, reweight and audit over every shard.",
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
        curate=CurateResource(),
    )
    return resources


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or Settings.from_env()
    return Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[shard_job, corpus_job, discover_shards_job, shard_job_celery, corpus_job_celery],
        sensors=[shard_sensor],
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
