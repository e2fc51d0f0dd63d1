"""Metadata the asset pages show: previews as inline tables, plots inline when served, links never absolute."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from dagster import MetadataValue

from dedup_assets.defs.metadata import counts_table, file_link, plot_metadata, table_preview


def test_table_preview_keeps_types_shortens_text_and_caps_rows() -> None:
    df = pl.DataFrame({"id": ["a", "b" * 100, "c"], "n": [1, 2, 3], "x": [0.5, math.nan, None], "ok": [True, False, None]})
    v = table_preview(df, limit=2, max_chars=10)
    assert [c.name for c in v.schema.columns] == ["id", "n", "x", "ok"]
    rows = [r.data for r in v.records]
    assert rows == [{"id": "a", "n": 1, "x": 0.5, "ok": True}, {"id": "b" * 9 + "…", "n": 2, "x": None, "ok": False}]
    assert table_preview(df.head(0)).records == []


def test_counts_table_is_largest_first() -> None:
    v = counts_table({"small": 1, "big": 5, "also_big": 5})
    assert [(r.data["reason"], r.data["count"]) for r in v.records] == [("also_big", 5), ("big", 5), ("small", 1)]


def test_links_are_urls_when_served_else_relative_to_the_warehouse_folder(tmp_path: Path) -> None:
    files = tmp_path / "wh_files"
    page = files / "sub dir" / "p.html"
    page.parent.mkdir(parents=True)
    page.write_text("x")
    assert file_link(page, files, "http://h:1/") == MetadataValue.url("http://h:1/sub%20dir/p.html")
    assert file_link(page, files, None) == MetadataValue.path("wh_files/sub dir/p.html")
    assert file_link(tmp_path / "elsewhere.txt", files, None) == MetadataValue.path(str(tmp_path / "elsewhere.txt"))


def test_plots_are_kept_as_files_and_shown_inline_when_served(tmp_path: Path) -> None:
    files = tmp_path / "wh_files"
    png = b"\x89PNG fake"
    served = plot_metadata(png, "sizes", files / "plots" / "a.png", "http://h:1", files)
    assert served == MetadataValue.md("![sizes](http://h:1/plots/a.png)") and len(served.value) < 1000  # inline in the UI
    assert (files / "plots" / "a.png").read_bytes() == png
    embedded = plot_metadata(png, "sizes", files / "plots" / "b.png", None, files)
    assert embedded.value.startswith("![sizes](data:image/png;base64,")
