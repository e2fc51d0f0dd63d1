"""Shared fixtures: a small image dataset made with PIL, a temp warehouse, a temp Dagster instance."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from dagster import DagsterInstance
from PIL import Image


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


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class SmallDataset:
    root: Path
    generated: Path
    shards: list[str]
    planted: dict[str, str]  # copy image_id -> base image_id
    hostile: dict[str, str]  # image_id -> expected status
    generated_copies: list[str]
    generated_novel: list[str]


def make_small_dataset(root: Path, generated: Path, n_bases: int = 24, seed: int = 3) -> SmallDataset:
    """Two shards (a folder and a tar): bases, planted near-copies (some across shards), hostile files."""
    from dedup_assets.synth.bases import make_base_images
    from dedup_assets.synth.hostile import write_folder_shard, write_tar_shard
    from dedup_assets.synth.transforms import TRANSFORMS

    rng = np.random.default_rng(seed)
    bases = make_base_images(n_bases, seed=seed)
    files: dict[str, dict[str, bytes]] = {"s0": {}, "s1": {}}
    caps: dict[str, dict[str, str]] = {"s0": {}, "s1": {}}
    metas: dict[str, dict[str, dict]] = {"s0": {}, "s1": {}}
    planted: dict[str, str] = {}
    for b, (_, img) in enumerate(bases):
        shard = "s0" if b % 2 == 0 else "s1"
        files[shard][f"b{b:03d}.jpg"] = _jpeg(img)
        caps[shard][f"b{b:03d}"] = f"a picture number {b} of a calm scene"
        metas[shard][f"b{b:03d}"] = {"url": f"https://example.org/{b}.jpg"}
    # Mild transformations only: these must be found by any reasonable embedder.
    mild = ["resize", "jpeg", "flip"]
    for b in range(0, n_bases, 4):
        for c, op in enumerate(mild[: 1 + b % 3]):
            op_fn = TRANSFORMS[op]
            copy = op_fn(bases[b][1], rng)
            shard = "s1" if c % 2 == 0 else "s0"  # across shards too
            key = f"b{b:03d}c{c}"
            files[shard][f"{key}.jpg"] = _jpeg(copy, 85)
            caps[shard][key] = f"a picture number {b} of a calm scene, copy"
            planted[f"{shard}/{key}"] = f"{'s0' if b % 2 == 0 else 's1'}/b{b:03d}"
    files["s0"]["empty.jpg"] = b""
    files["s0"]["notimage.jpg"] = b"this is not an image at all"
    files["s0"]["truncated.jpg"] = _jpeg(bases[1][1])[:600]
    hostile = {"s0/empty": "empty_file", "s0/notimage": "not_an_image", "s0/truncated": "truncated"}
    write_folder_shard(root / "s0", files["s0"], caps["s0"], metas["s0"])
    write_tar_shard(root / "s1.tar", files["s1"], caps["s1"], metas["s1"])

    generated.mkdir(parents=True, exist_ok=True)
    copies, novel = [], []
    for g, b in enumerate([0, 8]):
        (generated / f"copy{g}.png").write_bytes(_jpeg(TRANSFORMS["resize"](bases[b][1], rng), 80))
        (generated / f"copy{g}.txt").write_text(f"a prompt for copy {g}")
        copies.append(f"copy{g}.png")
    for g, (_, img) in enumerate(make_base_images(2, seed=seed + 999)):
        (generated / f"novel{g}.png").write_bytes(_jpeg(img))
        novel.append(f"novel{g}.png")
    return SmallDataset(root, generated, ["s0", "s1"], planted, hostile, copies, novel)


@pytest.fixture
def small_dataset(tmp_path: Path) -> SmallDataset:
    return make_small_dataset(tmp_path / "source", tmp_path / "generated")


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A persistent (sqlite) instance in a temp DAGSTER_HOME, as dynamic partitions need one."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst
