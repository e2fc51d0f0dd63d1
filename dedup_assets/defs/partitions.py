"""Shards are partitions: one dynamic partition per shard folder or tar under the dataset root."""

from dagster import DynamicPartitionsDefinition

SHARDS_PARTITIONS_NAME = "shards"
shards_partitions = DynamicPartitionsDefinition(name=SHARDS_PARTITIONS_NAME)
