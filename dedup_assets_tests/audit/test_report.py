"""HTML review pages and markdown summaries: written, self-contained, thumbnails inside, text escaped."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dedup_assets.audit.report import (
    anchor,
    audit_markdown,
    thumbnail_data_uri,
    write_audit_html,
    write_groups_review_html,
)
from dedup_assets.audit.search import AUDIT_SCHEMA

EVIL = "<script>alert('x')</script>"


def _img(seed: int, size: tuple[int, int] = (200, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _files(root: Path, n: int) -> dict[str, str]:
    """n training images on disk; image_id → location (a plain path)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"t{i}.jpg"
        _img(i).save(p, "JPEG")
        out[f"s0/t{i}"] = str(p)
    return out


def _decode_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _uris(page: str) -> list[str]:
    return re.findall(r"src=\"(data:image/jpeg;base64,[A-Za-z0-9+/=]+)\"", page)


def test_thumbnail_from_image_bytes_or_path(tmp_path: Path) -> None:
    img = _img(0, (400, 100))
    assert _decode_uri(thumbnail_data_uri(img, max_side=80)).size == (80, 20)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert _decode_uri(thumbnail_data_uri(buf.getvalue(), max_side=80)).size == (80, 20)
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    assert _decode_uri(thumbnail_data_uri(tmp_path / "x.png", max_side=100)).size == (100, 25)
    assert thumbnail_data_uri(b"not an image") == ""


def _audit_frame() -> pl.DataFrame:
    rows = [
        ("novel.png", None, 1, "s0/t2", 0.41, False, True, "not_verified"),
        ("novel.png", None, 2, "s0/t1", 0.30, False, True, "not_verified"),
        ("copy.png", EVIL, 1, "s0/t0", 0.991, True, False, "accepted"),
        ("copy.png", EVIL, 2, "s0/missing", 0.35, False, True, "not_verified"),
    ]
    return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row")


def test_audit_page_is_self_contained_flagged_first_and_escaped(tmp_path: Path) -> None:
    locations = _files(tmp_path / "train", 3)
    locations["s0/missing"] = str(tmp_path / "train" / "gone.jpg")
    gen = tmp_path / "gen"
    gen.mkdir()
    _img(10).save(gen / "copy.png")
    _img(11).save(gen / "novel.png")
    out = write_audit_html(
        _audit_frame(), {"copy.png": gen / "copy.png", "novel.png": gen / "novel.png"}, locations,
        tmp_path / "report" / "audit.html", groups_page="duplicate_groups.html",
    )
    page = out.read_text(encoding="utf-8")

    # 2 generated + 3 readable training thumbnails; the missing file becomes a placeholder.
    assert len(_uris(page)) == 5
    assert "(unreadable)" in page
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page  # the audit page needs no script at all
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "no external assets"
    assert page.index("copy.png") < page.index("novel.png"), "flagged generated images first"
    assert "FLAGGED" in page and "1 of 2 generated images" in page
    assert f"duplicate_groups.html#{anchor('img', 's0/t0')}" in page


def test_audit_markdown_is_compact_and_flagged_first() -> None:
    md = audit_markdown(_audit_frame().with_columns(pl.col("generated").str.replace("novel", "no|vel")))
    lines = md.splitlines()
    assert lines[0].startswith("| generated |") and len(lines) == 4
    assert lines[2].startswith("| copy.png | s0/t0 | 0.991 | **yes** | no |")
    assert "no\\|vel.png" in lines[3]
    capped = audit_markdown(_audit_frame(), limit=1).splitlines()
    assert capped[2].startswith("| copy.png |") and capped[-1] == "_1 more generated images_"
    assert audit_markdown(pl.DataFrame(schema=AUDIT_SCHEMA)) == "_no generated images audited_"


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
    locations = _files(tmp_path / "train", 9)
    captions = {"s0/t1": EVIL, "s0/t4": "a plain caption"}
    audit = pl.DataFrame([("gen/copy.png", None, 1, "s0/t5", 0.99, True, True, "accepted")], schema=AUDIT_SCHEMA, orient="row")
    out = write_groups_review_html(
        _groups(), locations, tmp_path / "groups.html", captions=captions, audit=audit, audit_page="audit.html"
    )
    page = out.read_text(encoding="utf-8")

    assert len(_uris(page)) == 9
    assert _group_order(page) == ["g-big", "&lt;g&amp;mid&gt;", "g-tight"]  # by size
    assert page.count("class='member keeper'") == 3
    assert "0.800" in page and "0.990" in page
    assert EVIL not in page and "&lt;script&gt;" in page and "a plain caption" in page
    assert f"id='{anchor('img', 's0/t5')}'" in page
    assert f"href='audit.html#{anchor('gen', 'gen/copy.png')}'" in page
    # The inline control: sort buttons and a τ slider starting at the loosest similarity.
    assert "id=bysize" in page and "id=bysim" in page
    assert re.search(r"type=range min='0\.80' max='1'", page)
    assert page.count("<script>") == 1
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "no external assets"

    by_sim = write_groups_review_html(_groups(), locations, tmp_path / "by_sim.html", sort="similarity", max_groups=2)
    assert _group_order(by_sim.read_text(encoding="utf-8")) == ["g-big", "&lt;g&amp;mid&gt;"]  # loosest first, capped


def test_groups_page_draws_the_matches_that_verified_a_pair(tmp_path: Path) -> None:
    locations = _files(tmp_path / "train", 9)
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
