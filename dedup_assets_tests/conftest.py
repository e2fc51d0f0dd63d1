"""Shared fixtures: the small synthetic dataset (built in `dedup_assets.synth.datasets`), a temp Dagster instance."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from dagster import DagsterInstance

from dedup_assets.synth import datasets
from dedup_assets.synth.datasets import SyntheticDataset


@pytest.fixture(autouse=True, scope="session")
def _private_settings_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads or writes a real settings file (dedup_assets.settings): a run in a test would
    otherwise write the repository's `dedup_assets.env` and change the defaults of later tests."""
    import os

    path = tmp_path_factory.mktemp("settings") / "dedup_assets.env"
    old = os.environ.get("DEDUP_ASSETS_SETTINGS")
    os.environ["DEDUP_ASSETS_SETTINGS"] = str(path)
    yield
    if old is None:
        os.environ.pop("DEDUP_ASSETS_SETTINGS", None)
    else:
        os.environ["DEDUP_ASSETS_SETTINGS"] = old


SmallDataset = SyntheticDataset  # the tests' name for it


@pytest.fixture
def small_dataset(tmp_path: Path) -> SmallDataset:
    """The tests' dataset (`synth.datasets.small_dataset`): two shards, planted copies, hostile files."""
    return datasets.small_dataset(tmp_path / "source", tmp_path / "generated")


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A persistent (sqlite) instance in a temp DAGSTER_HOME, as dynamic partitions need one."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst
