"""The duplicate-groups review page: keepers marked, sorted, escaped, matches drawn, the slider
starting at τ, linked to the audit page."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from dedup_assets.audit.search import AUDIT_SCHEMA
from dedup_assets.dedup.review_page import write_groups_review_html
from dedup_assets.html import anchor
from dedup_assets_tests.page_helpers import EVIL, data_uris, image_files


def _groups() -> pl.DataFrame:
    # g-big: 4 images, loose (0.80); g-tight: 2 images (0.99); g-mid: 3 images (0.90).
    rows = [
        ("s0/t0", "g-big", True, 1.0), ("s0/t1", "g-big", False, 0.95), ("s0/t2", "g-big", False, 0.80),
        ("s0/t3", "g-big", False, 0.93),
        ("s0/t4", "g-tight", True, 1.0), ("s0/t5", "g-tight", False, 0.99),
        ("s0/t6", "<g&mid>", True, 1.0), ("s0/t7", "<g&mid>", False, 0.90), ("s0/t8", "<g&mid>", False, 0.92),
    ]
    return pl.DataFrame(
        rows, schema={"image_id": pl.String, "group_id": pl.String, "is_keeper": pl.Boolean,
                      "similarity_to_keeper": pl.Float32}, orient="row",
    )


def _group_order(page: str) -> list[str]:
    return re.findall(r"<h3>group (.*?) —", page)


def test_groups_page_marks_keepers_sorts_and_escapes(tmp_path: Path) -> None:
    locations = image_files(tmp_path / "train", 9)
    captions = {"s0/t1": EVIL, "s0/t4": "a plain caption"}
    audit = pl.DataFrame([("gen/copy.png", None, 1, "s0/t5", 0.99, True, True, "accepted")], schema=AUDIT_SCHEMA, orient="row")
    out = write_groups_review_html(
        _groups(), locations, tmp_path / "groups.html", captions=captions, audit=audit, audit_page="audit.html"
    )
    page = out.read_text(encoding="utf-8")

    assert len(data_uris(page)) == 9
    assert _group_order(page) == ["g-big", "&lt;g&amp;mid&gt;", "g-tight"]  # by size
    assert page.count("class='member keeper'") == 3
    assert "0.800" in page and "0.990" in page
    assert EVIL not in page and "&lt;script&gt;" in page and "a plain caption" in page
    assert f"id='{anchor('img', 's0/t5')}'" in page
    assert f"href='audit.html#{anchor('gen', 'gen/copy.png')}'" in page
    # The inline control: sort buttons and a τ slider starting at the loosest similarity.
    assert "id=bysize" in page and "id=bysim" in page
    assert re.search(r"type=range min='0\.80' max='1' step='0.001' value='0.800'", page)
    assert "<nav class=links><a href='audit.html'>regurgitation audit</a></nav>" in page
    assert page.count("<script>") == 1
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "no external assets"

    by_sim = write_groups_review_html(_groups(), locations, tmp_path / "by_sim.html", sort="similarity", max_groups=2)
    assert _group_order(by_sim.read_text(encoding="utf-8")) == ["g-big", "&lt;g&amp;mid&gt;"]  # loosest first, capped


def test_groups_page_draws_the_matches_that_verified_a_pair(tmp_path: Path) -> None:
    locations = image_files(tmp_path / "train", 9)
    groups = _groups()
    member = groups.filter(~pl.col("is_keeper"))["image_id"][0]
    pts = [0.1, 0.2, 0.5, 0.5, 0.9, 0.75]
    out = write_groups_review_html(groups, locations, tmp_path / "g.html",
                                   verdicts={member: ("accepted", 3, pts), "s0/none": ("<b>x</b>", None, None)})
    page = out.read_text(encoding="utf-8")
    block = page[page.index(f"id='{anchor('img', member)}'"):]
    block = block[: block.index("</div>")]
    assert "<svg viewBox='0 0 1 1'" in block and block.count("<circle") == 3
    assert "cx='0.5000' cy='0.5000'" in block and "accepted, 3 matches" in block
    assert page.count("<svg") == 1  # only the member with points


def test_groups_page_rejects_unknown_sort(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sort must be"):
        write_groups_review_html(_groups(), {}, tmp_path / "x.html", sort="random")  # type: ignore[arg-type]


def test_groups_page_slider_starts_at_the_tau_the_groups_were_built_with(tmp_path: Path) -> None:
    page = write_groups_review_html(_groups(), {}, tmp_path / "g.html", tau=0.85).read_text(encoding="utf-8")
    assert re.search(r"type=range min='0\.80' max='1' step='0.001' value='0.850'", page)
    below = write_groups_review_html(_groups(), {}, tmp_path / "b.html", tau=0.7).read_text(encoding="utf-8")
    assert re.search(r"type=range min='0\.70' max='1' step='0.001' value='0.700'", below)  # τ below every member
    assert "<nav" not in page  # no audit page given: no link to one
