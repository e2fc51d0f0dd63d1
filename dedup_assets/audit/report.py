"""Self-contained HTML review pages (base64 thumbnails, no external assets) and markdown summaries.

- `regurgitation_audit.html`: each generated image beside its nearest training images, flagged first.
- `duplicate_groups.html`: each group as a row of thumbnails (keeper marked), sortable by size or
  by tightness, with a similarity slider that hides members below it — to tune τ by eye.
All text is HTML-escaped (captions and file names come from the web).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Literal

import polars as pl
from PIL import Image


def thumbnail_data_uri(image_or_bytes: Image.Image | bytes, max_side: int = 160) -> str:
    """A JPEG data URI of a thumbnail ("" when the bytes cannot be decoded)."""
    try:
        if isinstance(image_or_bytes, (bytes, bytearray)):
            from dedup_assets.ingest.decode import decode_rgb

            img = decode_rgb(bytes(image_or_bytes), target_side=max_side)
        else:
            img = image_or_bytes.convert("RGB")
        img = img.copy()
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:
        return ""


def _loc_thumb(location: str | None, max_side: int = 160) -> str:
    if not location:
        return ""
    from dedup_assets.ingest.shards import read_location

    try:
        return thumbnail_data_uri(read_location(location), max_side)
    except OSError:
        return ""


def _img(uri: str, alt: str) -> str:
    if not uri:
        return f'<div class="missing">{html.escape(alt)}<br>(unreadable)</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


_STYLE = """<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:12px}img{max-width:160px;display:block}
.flag{background:#fde2e2}.keeper{outline:3px solid #2a8c2a}.member{display:inline-block;margin:2px;text-align:center}
.missing{width:120px;height:90px;background:#eee;font-size:10px}</style>"""


def write_audit_html(audit: pl.DataFrame, gen_paths: dict[str, Path], train_locations: dict[str, str], out: Path) -> Path:
    """Side-by-side page: generated | nearest training images with similarity; flagged first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>Regurgitation audit</title>", _STYLE,
             "<h1>Regurgitation audit</h1>"]
    if audit.height == 0:
        parts.append("<p>No generated images were audited.</p>")
    else:
        flagged_gen = set(audit.filter(pl.col("flagged"))["generated"].to_list())
        parts.append(f"<p>{len(flagged_gen)} of {audit['generated'].n_unique()} generated images are near-copies.</p><table>")
        order = sorted(audit["generated"].unique().to_list(), key=lambda g: (g not in flagged_gen, g))
        for g in order:
            rows = audit.filter(pl.col("generated") == g).sort("rank")
            p = gen_paths.get(g)
            gen_uri = thumbnail_data_uri(Path(p).read_bytes()) if p and Path(p).exists() else ""
            prompt = rows["prompt"][0]
            cells = [f"<td>{_img(gen_uri, g)}<b>{html.escape(g)}</b><br>{html.escape(prompt or '')}</td>"]
            for r in rows.iter_rows(named=True):
                cls = " class='flag'" if r["flagged"] else ""
                cells.append(
                    f"<td{cls}>{_img(_loc_thumb(train_locations.get(r['image_id'])), r['image_id'])}"
                    f"#{r['rank']} {html.escape(r['image_id'])}<br>similarity {r['similarity']:.3f}"
                    f"{' <b>FLAGGED</b>' if r['flagged'] else ''}<br>{'kept' if r['kept_in_filtered'] else 'not in filtered set'}</td>"
                )
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def audit_markdown(audit: pl.DataFrame, limit: int = 10) -> str:
    """Compact markdown: the best match of each generated image, flagged first."""
    if audit.height == 0:
        return "_no generated images audited_"
    top = audit.filter(pl.col("rank") == 1).sort(["flagged", "similarity"], descending=[True, True]).head(limit)
    lines = ["| generated | nearest training image | similarity | flagged | kept |", "|---|---|---|---|---|"]
    for r in top.iter_rows(named=True):
        lines.append(f"| {r['generated']} | {r['image_id']} | {r['similarity']:.3f} | {'**yes**' if r['flagged'] else 'no'} | {r['kept_in_filtered']} |")
    return "\n".join(lines)


def write_groups_review_html(
    groups: pl.DataFrame,
    locations: dict[str, str],
    out: Path,
    max_groups: int = 200,
    sort: Literal["size", "similarity"] = "size",
) -> Path:
    """A page to look through duplicate groups (keeper marked), re-sortable, with a τ slider."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keepers = groups.filter(pl.col("is_keeper"))
    keepers = keepers.sort("group_size", descending=True) if sort == "size" else keepers.sort("group_min_similarity")
    keepers = keepers.head(max_groups)
    parts = ["<!doctype html><meta charset='utf-8'><title>Duplicate groups</title>", _STYLE,
             "<h1>Duplicate groups</h1>",
             f"<p>{groups.filter(pl.col('is_keeper')).height} groups, {groups.height} images; showing {keepers.height}. "
             "Keeper outlined in green.</p>",
             "<p>Sort: <button onclick=\"sortBy('size')\">size</button> <button onclick=\"sortBy('sim')\">tightness</button> "
             "&nbsp; hide members below similarity <input type=range min=0.5 max=1 step=0.01 value=0.5 id=tau "
             "oninput=\"tauChanged(this.value)\"> <span id=tauv>0.50</span></p><div id=groups>"]
    for k in keepers.iter_rows(named=True):
        members = groups.filter(pl.col("group_id") == k["group_id"]).sort("similarity_to_keeper", descending=True)
        items = []
        for m in members.head(24).iter_rows(named=True):
            cls = "member keeper" if m["is_keeper"] else "member"
            items.append(
                f"<div class='{cls}' data-sim='{m['similarity_to_keeper']:.4f}'>"
                f"{_img(_loc_thumb(locations.get(m['image_id']), 120), m['image_id'])}"
                f"{html.escape(m['image_id'])}<br>{m['similarity_to_keeper']:.3f}</div>"
            )
        parts.append(
            f"<div class='group' data-size='{k['group_size']}' data-min='{k['group_min_similarity']:.4f}'>"
            f"<h3>group {html.escape(str(k['group_id']))} — {k['group_size']} images, min similarity "
            f"{k['group_min_similarity']:.3f}</h3>{''.join(items)}</div>"
        )
    parts.append("""</div><script>
function sortBy(key){const c=document.getElementById('groups');const g=[...c.children];
g.sort((a,b)=>key==='size'?b.dataset.size-a.dataset.size:a.dataset.min-b.dataset.min);g.forEach(x=>c.appendChild(x));}
function tauChanged(v){document.getElementById('tauv').textContent=Number(v).toFixed(2);
document.querySelectorAll('.member').forEach(m=>{m.style.opacity=(m.dataset.sim>=v)?1:0.15;});}
</script>""")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
