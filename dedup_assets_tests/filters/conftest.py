"""Index frames for the pre-filter tests, built on the ingest stage's real schema."""

from __future__ import annotations

from typing import Any, Callable

import polars as pl
import pytest

from dedup_assets.ingest.index import INDEX_SCHEMA


def index_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """An image_index frame; every column not given is null, a decodable 640x480 JPEG by default."""
    base: dict[str, Any] = {k: None for k in INDEX_SCHEMA}
    base.update({"shard": "s", "status": "ok", "format": "JPEG", "width": 640, "height": 480, "bytes": 50_000})
    filled = []
    for n, r in enumerate(rows):
        row = {**base, **r}
        row.setdefault("image_id", None)
        if row["image_id"] is None:
            row["image_id"] = f"{row['shard']}/{n:04d}"
        row["key"] = row["image_id"].split("/", 1)[-1]
        filled.append(row)
    return pl.DataFrame(filled, schema=INDEX_SCHEMA)


@pytest.fixture
def make_index() -> Callable[[list[dict[str, Any]]], pl.DataFrame]:
    return index_frame
