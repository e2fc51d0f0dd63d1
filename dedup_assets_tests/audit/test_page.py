"""The audit page and its markdown summary: self-contained, thumbnails inside, text escaped, linked
to the groups page."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from dedup_assets.audit.page import best_matches, write_audit_html
from dedup_assets.audit.search import AUDIT_SCHEMA
from dedup_assets.html import anchor
from dedup_assets_tests.page_helpers import EVIL, data_uris, image_files, make_image


def _audit_frame() -> pl.DataFrame:
    rows = [
        ("novel.png", None, 1, "s0/t2", 0.41, False, True, "not_verified"),
        ("novel.png", None, 2, "s0/t1", 0.30, False, True, "not_verified"),
        ("copy.png", EVIL, 1, "s0/t0", 0.991, True, False, "accepted"),
        ("copy.png", EVIL, 2, "s0/missing", 0.35, False, True, "not_verified"),
    ]
    return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row")


def test_audit_page_is_self_contained_flagged_first_and_escaped(tmp_path: Path) -> None:
    locations = image_files(tmp_path / "train", 3)
    locations["s0/missing"] = str(tmp_path / "train" / "gone.jpg")
    gen = tmp_path / "gen"
    gen.mkdir()
    make_image(10).save(gen / "copy.png")
    make_image(11).save(gen / "novel.png")
    out = write_audit_html(
        _audit_frame(), {"copy.png": gen / "copy.png", "novel.png": gen / "novel.png"}, locations,
        tmp_path / "report" / "audit.html", groups_page="duplicate_groups.html",
    )
    page = out.read_text(encoding="utf-8")

    # 2 generated + 3 readable training thumbnails; the missing file becomes a placeholder.
    assert len(data_uris(page)) == 5
    assert "(unreadable)" in page
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page  # the audit page needs no script at all
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "no external assets"
    assert page.index("copy.png") < page.index("novel.png"), "flagged generated images first"
    assert "FLAGGED" in page and "1 of 2 generated images" in page
    assert f"duplicate_groups.html#{anchor('img', 's0/t0')}" in page
    assert "<nav class=links><a href='duplicate_groups.html'>duplicate groups</a></nav>" in page
    assert ">accepted<" in page and "not_verified" not in page  # verdicts shown where there is one
    alone = write_audit_html(_audit_frame(), {}, locations, tmp_path / "alone.html").read_text(encoding="utf-8")
    assert "<nav" not in alone and "duplicate_groups.html" not in alone


def test_best_matches_lists_each_generated_image_once_flagged_first() -> None:
    best = best_matches(_audit_frame())
    assert best["generated"].to_list() == ["copy.png", "novel.png"]
    assert best.row(0, named=True) == {"generated": "copy.png", "nearest_training_image": "s0/t0", "similarity": 0.991,
                                       "flagged": True, "kept": False, "verdict": "accepted"}
    assert best_matches(pl.DataFrame(schema=AUDIT_SCHEMA)).height == 0
