"""The small HTML kit both review pages are written with (no Dagster, no external assets).

Pages embed base64 JPEG thumbnails, so one file can be mailed or attached. Every piece of text
(captions, prompts, file names: all from the web) goes through `esc`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import Literal

from PIL import Image

CAPTION_CHARS = 120


def thumbnail_data_uri(image_or_bytes: Image.Image | bytes | Path, max_side: int = 160) -> str:
    """A `data:image/jpeg;base64,…` URI of a thumbnail at most max_side px on a side.

    Accepts a PIL image, encoded bytes or a file path; returns "" when the input cannot be read
    or decoded (a review page shows a placeholder rather than fail).
    """
    try:
        if isinstance(image_or_bytes, Path):
            image_or_bytes = image_or_bytes.read_bytes()
        if isinstance(image_or_bytes, (bytes, bytearray)):
            from dedup_assets.ingest.decode import decode_rgb

            img = decode_rgb(bytes(image_or_bytes), target_side=max_side)
        else:
            img = image_or_bytes.convert("RGB")
        img = img.copy()
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # any undecodable input becomes a placeholder, by design
        return ""


def anchor(kind: Literal["img", "gen", "group"], ident: str) -> str:
    """A stable HTML id for an image, generated image or group (ids may hold any characters)."""
    return f"{kind}-{hashlib.sha1(ident.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


class Thumbs:
    """Thumbnails by location, each read once per page (one image can appear many times)."""

    def __init__(self, locations: dict[str, str], max_side: int) -> None:
        self.locations = locations
        self.max_side = max_side
        self.cache: dict[str, str] = {}

    def __call__(self, image_id: str) -> str:
        if image_id not in self.cache:
            self.cache[image_id] = self._read(self.locations.get(image_id))
        return self.cache[image_id]

    def _read(self, location: str | None) -> str:
        if not location:
            return ""
        from dedup_assets.ingest.shards import read_location

        try:
            return thumbnail_data_uri(read_location(location), self.max_side)
        except Exception:  # missing file, missing tar member, unreadable tar: placeholder
            return ""


def esc(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def shorten(text: str | None, n: int = CAPTION_CHARS) -> str:
    if not text:
        return ""
    return text if len(text) <= n else text[: n - 1] + "…"


def img_tag(uri: str, alt: str) -> str:
    if not uri:
        return f'<div class="missing">{esc(alt)}<br>(unreadable)</div>'
    return f'<img src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


STYLE = """<style>
body{font-family:sans-serif;margin:1em;color:#222}table{border-collapse:collapse}
td{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:12px;max-width:180px;word-wrap:break-word}
img{max-width:160px;display:block}.flag{background:#fde2e2}.keeper{outline:3px solid #2a8c2a}
.member{display:inline-block;margin:3px;text-align:center;font-size:11px;max-width:130px;vertical-align:top;
word-wrap:break-word}.missing{width:120px;height:90px;background:#eee;font-size:10px}
.badge{background:#c62828;color:#fff;padding:0 3px;border-radius:3px}.cap{color:#555}
.group{border-top:1px solid #ddd;padding:4px 0}.controls{position:sticky;top:0;background:#fff;padding:6px 0}
.matched { position: relative; display: inline-block; }
.matched svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.matched circle { fill: none; stroke: #ff0; stroke-width: 0.006; }
.verdict { font-size: 11px; color: #555; }
nav.links { font-size: 13px; margin-bottom: 6px; }
</style>"""


def page(title: str, body: list[str], links: dict[str, str] | None = None) -> str:
    """A whole page: head with STYLE, a bar of links to the sibling pages (label → relative URL),
    the title and the body."""
    nav = ""
    if links:
        nav = "<nav class=links>" + " · ".join(f"<a href='{esc(u)}'>{esc(t)}</a>" for t, u in links.items()) + "</nav>"
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>", STYLE,
        f"</head><body>{nav}<h1>{esc(title)}</h1>", *body, "</body></html>",
    ])
