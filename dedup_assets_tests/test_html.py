"""The small HTML kit of the review pages."""

from __future__ import annotations

import io
from pathlib import Path

from dedup_assets.html import anchor, esc, page, shorten, thumbnail_data_uri
from dedup_assets_tests.page_helpers import decode_uri, make_image


def test_thumbnail_from_image_bytes_or_path(tmp_path: Path) -> None:
    img = make_image(0, (400, 100))
    assert decode_uri(thumbnail_data_uri(img, max_side=80)).size == (80, 20)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert decode_uri(thumbnail_data_uri(buf.getvalue(), max_side=80)).size == (80, 20)
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    assert decode_uri(thumbnail_data_uri(tmp_path / "x.png", max_side=100)).size == (100, 25)
    assert thumbnail_data_uri(b"not an image") == ""


def test_page_escapes_its_title_and_links_and_anchors_are_stable() -> None:
    html = page("a <b> title", ["<p>body</p>"], {"other & page": "x.html?a='1'"})
    assert "<title>a &lt;b&gt; title</title>" in html and "<p>body</p>" in html
    assert "<a href='x.html?a=&#x27;1&#x27;'>other &amp; page</a>" in html
    assert anchor("img", "s/k") == anchor("img", "s/k") != anchor("gen", "s/k")
    assert anchor("img", "a\udcff").startswith("img-")  # undecodable names from the web still get an id
    assert esc(None) == "" and shorten("x" * 200, 10) == "x" * 9 + "…"
