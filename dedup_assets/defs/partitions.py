"""Shards are partitions: one dynamic partition per shard folder or tar under the dataset root, or
per img_emb_{i}.npy + metadata_{i}.parquet pair (key emb_{i}) of external embeddings."""

from dagster import BackfillPolicy, DynamicPartitionsDefinition

SHARDS_PARTITIONS_NAME = "shards"
shards_partitions = DynamicPartitionsDefinition(name=SHARDS_PARTITIONS_NAME)

# Shards are independent, but a run costs seconds to start and (for open_clip) to load the model, so
# a backfill hands up to 8 shards to one run; the per-shard assets loop over `context.partition_keys`
# and write each shard in its own transaction.
SHARD_BACKFILL_POLICY = BackfillPolicy.multi_run(max_partitions_per_run=8)


def unregistered_shards(instance, keys) -> list[str]:  # noqa: ANN001 - DagsterInstance, iterable of keys
    """The keys (in order, each once) that are not yet partitions of `shards`."""
    known = set(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    return [k for k in dict.fromkeys(keys) if k not in known]


def register_shards_on(instance, keys) -> list[str]:  # noqa: ANN001
    """Add the keys that are not yet partitions (the discovery op and the CLI; the sensor asks for
    the same keys through a dynamic-partitions request); returns the ones added."""
    new = unregistered_shards(instance, keys)
    if new:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, new)
    return new


def per_shard_asset(name: str, group: str, **kwargs):  # noqa: ANN003, ANN201
    """`@asset` for a per-shard table: partitioned by shard, backfilled up to 8 shards per run, in
    `group`, with the catalog's column schema of table `name` (every per-shard asset is one)."""
    from dagster import asset

    from dedup_assets.tables import column_schema

    return asset(
        name=name,
        partitions_def=shards_partitions,
        backfill_policy=SHARD_BACKFILL_POLICY,
        group_name=group,
        metadata={"dagster/column_schema": column_schema(name)},
        **kwargs,
    )


# Label sets are partitions too: one per set of table `labels` (e.g. "violence"), so each filter
# classifier is materialized, retrained and shown on its own (`dedup-assets label` and the label
# sensor add the partition; the UI can add one by hand).
LABEL_SETS_PARTITIONS_NAME = "label_sets"
label_sets_partitions = DynamicPartitionsDefinition(name=LABEL_SETS_PARTITIONS_NAME)


LABEL_SET_NAME = r"[A-Za-z0-9_-]{1,64}"  # a set names files (labelling_<set>.html) and reasons


def check_label_set_name(name: str) -> str:
    """`name` when it may name a label set, else ValueError (a partition added by hand in the UI may
    hold '/' or '..', and the asset writes files named after it)."""
    import re

    if not re.fullmatch(LABEL_SET_NAME, name):
        raise ValueError(f"label set {name!r}: use 1–64 letters, digits, '_' or '-' (it names files and reasons)")
    return name


def register_label_sets_on(instance, names) -> list[str]:  # noqa: ANN001 - DagsterInstance, iterable of names
    """Add the label sets that are not yet partitions of `label_sets`; returns the ones added."""
    names = [check_label_set_name(n) for n in names]
    known = set(instance.get_dynamic_partitions(LABEL_SETS_PARTITIONS_NAME))
    new = [n for n in dict.fromkeys(names) if n not in known]
    if new:
        instance.add_dynamic_partitions(LABEL_SETS_PARTITIONS_NAME, new)
    return new
