"""Self-contained HTML review pages and markdown summaries (no Dagster, no external assets).

- `write_audit_html`: one table row per generated image — its thumbnail and prompt, then its
  nearest training images with similarity, flagged (near-copy) images first.
- `write_groups_review_html`: one row of thumbnails per duplicate group (keeper outlined), with a
  small inline script to re-sort by size or by loosest member and a similarity slider that dims
  members below τ and hides groups left without a duplicate — to tune τ by eye. Members that a
  generated image matched (from an audit frame) carry a badge linking to the audit page, and the
  audit page links its training images to their group here.

Pages embed base64 JPEG thumbnails, so one file can be mailed or attached. Every piece of text
(captions, prompts, file names: all from the web) is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import Literal

import polars as pl
from PIL import Image

_MAX_MEMBERS_SHOWN = 16
_CAPTION_CHARS = 120


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


class _Thumbs:
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


def _e(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _short(text: str | None, n: int = _CAPTION_CHARS) -> str:
    if not text:
        return ""
    return text if len(text) <= n else text[: n - 1] + "…"


def _img(uri: str, alt: str) -> str:
    if not uri:
        return f'<div class="missing">{_e(alt)}<br>(unreadable)</div>'
    return f'<img src="{uri}" alt="{_e(alt)}" title="{_e(alt)}">'


_STYLE = """<style>
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
</style>"""


def write_audit_html(
    audit: pl.DataFrame,
    gen_paths: dict[str, Path],
    train_locations: dict[str, str],
    out: Path,
    groups_page: str | None = None,
) -> Path:
    """Write the audit page to `out` and return it.

    `audit`: AUDIT_SCHEMA rows; `gen_paths`: generated id → image file; `train_locations`:
    training image_id → location. With `groups_page` (a URL relative to `out`, e.g.
    "duplicate_groups.html"), each training image links to its entry there.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    thumbs = _Thumbs(train_locations, 160)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Regurgitation audit</title>",
        _STYLE,
        "</head><body><h1>Regurgitation audit</h1>",
    ]
    if audit.height == 0:
        parts.append("<p>No generated images were audited.</p>")
    else:
        flagged_gen = set(audit.filter(pl.col("flagged"))["generated"].to_list())
        n_gen = audit["generated"].n_unique()
        parts.append(
            f"<p>{len(flagged_gen)} of {n_gen} generated images have a near-copy in the training set "
            "(flagged rows in red). Each row: the generated image, then its nearest training images, "
            "searched over the whole training set before deduplication.</p><table>"
        )
        by_gen = {str(k[0]): v.sort("rank") for k, v in audit.group_by("generated")}
        for g in sorted(by_gen, key=lambda g: (g not in flagged_gen, g)):
            rows = by_gen[g]
            p = gen_paths.get(g)
            gen_uri = thumbnail_data_uri(Path(p)) if p is not None else ""
            prompt = rows["prompt"][0]
            cells = [
                f"<td id='{anchor('gen', g)}'>{_img(gen_uri, g)}<b>{_e(g)}</b><br>"
                f"<span class='cap'>{_e(_short(prompt))}</span></td>"
            ]
            for r in rows.iter_rows(named=True):
                tid = r["image_id"]
                name = _e(tid)
                if groups_page:
                    name = f"<a href='{_e(groups_page)}#{anchor('img', tid)}'>{name}</a>"
                cells.append(
                    f"<td{' class=flag' if r['flagged'] else ''}>{_img(thumbs(tid), tid)}"
                    f"#{int(r['rank'])} {name}<br>similarity {float(r['similarity']):.3f}"
                    f"{' <b>FLAGGED</b>' if r['flagged'] else ''}<br>"
                    f"{'kept in filtered set' if r['kept_in_filtered'] else 'not in filtered set'}</td>"
                )
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def audit_markdown(audit: pl.DataFrame, limit: int = 10) -> str:
    """A compact markdown table: the best match of each generated image, flagged first, then by
    similarity (for Dagster metadata)."""
    if audit.height == 0:
        return "_no generated images audited_"
    top = (
        audit.filter(pl.col("rank") == 1)
        .sort(["flagged", "similarity", "generated"], descending=[True, True, False])
    )
    lines = [
        "| generated | nearest training image | similarity | flagged | kept |",
        "|---|---|---|---|---|",
    ]
    for r in top.head(limit).iter_rows(named=True):
        lines.append(
            f"| {_md(r['generated'])} | {_md(r['image_id'])} | {float(r['similarity']):.3f} | "
            f"{'**yes**' if r['flagged'] else 'no'} | {'yes' if r['kept_in_filtered'] else 'no'} |"
        )
    if top.height > limit:
        lines.append(f"\n_{top.height - limit} more generated images_")
    return "\n".join(lines)


_GROUPS_JS = """<script>
(function(){
const box=document.getElementById('groups'), tau=document.getElementById('tau');
function sortBy(key){const g=[...box.children];
 g.sort((a,b)=>key==='size'?(b.dataset.size-a.dataset.size)||(a.dataset.min-b.dataset.min)
                         :(a.dataset.min-b.dataset.min)||(b.dataset.size-a.dataset.size));
 g.forEach(x=>box.appendChild(x));}
function apply(){const t=Number(tau.value);document.getElementById('tauv').textContent=t.toFixed(3);
 let groups=0,removed=0;
 for(const g of box.children){let n=0;
  for(const m of g.querySelectorAll('.member')){const dup=m.dataset.keeper==='1'||Number(m.dataset.sim)>=t;
   m.style.opacity=dup?1:0.2;if(m.dataset.keeper!=='1'&&dup)n++;}
  const more=[...(g.dataset.rest||'').split(',')].filter(s=>s!==''&&Number(s)>=t).length;n+=more;
  g.style.display=n>0?'':'none';if(n>0){groups++;removed+=n;}}
 document.getElementById('count').textContent=groups+' groups, '+removed+' images removed as duplicates at this τ';}
document.getElementById('bysize').onclick=()=>sortBy('size');
document.getElementById('bysim').onclick=()=>sortBy('sim');
tau.oninput=apply;apply();
})();
</script>"""


def _matched(img_html: str, verdict: tuple[str, int | None, list[float] | None] | None) -> str:
    """The thumbnail with the verifier's agreeing matches drawn over it (an SVG in image fractions)."""
    if not verdict or not verdict[2]:
        return img_html
    pts = verdict[2]
    dots = "".join(
        f"<circle cx='{float(x):.4f}' cy='{float(y):.4f}' r='0.014'/>" for x, y in zip(pts[0::2], pts[1::2])
    )
    return (
        "<span class=matched>" + img_html
        + "<svg viewBox='0 0 1 1' preserveAspectRatio='none' aria-label='matched keypoints'>" + dots + "</svg></span>"
    )


def _verdict_line(verdict: tuple[str, int | None, list[float] | None] | None) -> str:
    if not verdict:
        return ""
    text, inliers, _ = verdict
    extra = f", {inliers} matches" if inliers else ""
    return f"<br><span class=verdict>{_e(text)}{_e(extra)}</span>"


def write_groups_review_html(
    groups: pl.DataFrame,
    locations: dict[str, str],
    out: Path,
    max_groups: int = 200,
    sort: Literal["size", "similarity"] = "size",
    captions: dict[str, str] | None = None,
    audit: pl.DataFrame | None = None,
    audit_page: str | None = None,
    verdicts: dict[str, tuple[str, int | None, list[float] | None]] | None = None,
) -> Path:
    """Write the duplicate-groups review page to `out` and return it.

    `groups`: duplicate_groups rows (image_id, group_id, is_keeper, similarity_to_keeper);
    `locations`: image_id → location for the thumbnails; `sort`: initial order, "size" (largest
    first) or "similarity" (loosest group first: lowest member similarity to its keeper);
    `captions`: optional image_id → caption shown under each thumbnail; `audit`: optional
    audit rows whose flagged training images get a badge (linking to `audit_page` if given);
    `verdicts`: optional member image_id → (verification verdict of its pair with the keeper,
    agreeing matches, their x/y in the member as fractions) — the matches are drawn over the
    member's thumbnail, so a person sees why the pair was accepted.
    The slider's count is approximate: it uses each member's similarity to its keeper, while
    the real pipeline regroups through pairs.
    """
    if sort not in ("size", "similarity"):
        raise ValueError(f"sort must be 'size' or 'similarity', got {sort!r}")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    captions = captions or {}
    hits: dict[str, list[str]] = {}
    if audit is not None and audit.height:
        for gen, tid in audit.filter(pl.col("flagged")).select("generated", "image_id").iter_rows():
            hits.setdefault(tid, []).append(gen)

    g = groups.select(
        pl.col("image_id").cast(pl.String),
        pl.col("group_id").cast(pl.String),
        pl.col("is_keeper"),
        pl.when(pl.col("is_keeper"))
        .then(1.0)
        .otherwise(pl.col("similarity_to_keeper").cast(pl.Float64).fill_null(0.0))
        .alias("sim"),
    )
    summary = g.group_by("group_id").agg(
        pl.len().alias("size"),
        pl.col("sim").filter(~pl.col("is_keeper")).min().fill_null(1.0).alias("min_sim"),
    )
    order = ["size", "min_sim", "group_id"] if sort == "size" else ["min_sim", "size", "group_id"]
    desc = [True, False, False] if sort == "size" else [False, True, False]
    shown = summary.sort(order, descending=desc).head(max_groups)
    members = {
        str(k[0]): v.sort(["is_keeper", "sim", "image_id"], descending=[True, True, False])
        for k, v in g.join(shown.select("group_id"), on="group_id", how="semi").group_by("group_id")
    }
    lowest = float(summary["min_sim"].min()) if summary.height else 0.9
    slider_min = max(-1.0, min(0.99, int(lowest * 100) / 100))
    thumbs = _Thumbs(locations, 120)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Duplicate groups</title>",
        _STYLE,
        "</head><body><h1>Duplicate groups</h1>",
        f"<p>{summary.height} groups holding {g.height} images; showing {shown.height}. The keeper is "
        "outlined in green; the number under each image is its cosine similarity to the keeper.</p>",
        "<div class=controls>Sort: <button id=bysize>largest first</button> "
        "<button id=bysim>loosest first</button> &nbsp; τ "
        f"<input type=range min='{slider_min:.2f}' max='1' step='0.001' value='{slider_min:.2f}' id=tau> "
        "<span id=tauv></span> — <span id=count></span> "
        "<small>(approximate: similarity to the keeper; members below τ are dimmed)</small></div>",
        "<div id=groups>",
    ]
    for gid, size, min_sim in shown.select("group_id", "size", "min_sim").iter_rows():
        rows = members[gid]
        items = []
        for m in rows.head(_MAX_MEMBERS_SHOWN).iter_rows(named=True):
            iid = m["image_id"]
            badge = ""
            if iid in hits:
                text = f"matched by {len(hits[iid])} generated"
                link = f"{audit_page}#{anchor('gen', hits[iid][0])}" if audit_page else None
                badge = (
                    f"<br><a class=badge href='{_e(link)}'>{_e(text)}</a>"
                    if link
                    else f"<br><span class=badge>{_e(text)}</span>"
                )
            cap = captions.get(iid)
            items.append(
                f"<div id='{anchor('img', iid)}' class='member{' keeper' if m['is_keeper'] else ''}' "
                f"data-sim='{m['sim']:.4f}' data-keeper='{1 if m['is_keeper'] else 0}'>"
                f"{_matched(_img(thumbs(iid), iid), verdicts.get(iid) if verdicts else None)}"
                f"{_e(iid)}{' (keeper)' if m['is_keeper'] else ''}<br>"
                f"{m['sim']:.3f}{badge}{_verdict_line(verdicts.get(iid) if verdicts else None)}"
                f"{'<br><span class=cap>' + _e(_short(cap)) + '</span>' if cap else ''}</div>"
            )
        # Members beyond the shown ones still count towards the slider's totals.
        rest = ",".join(f"{s:.4f}" for s in rows.slice(_MAX_MEMBERS_SHOWN)["sim"].to_list())
        more = f"<div class=member>… {size - _MAX_MEMBERS_SHOWN} more</div>" if size > _MAX_MEMBERS_SHOWN else ""
        parts.append(
            f"<div class=group id='{anchor('group', gid)}' data-size='{size}' data-min='{min_sim:.4f}' "
            f"data-rest='{rest}'><h3>group {_e(gid)} — {size} images, lowest similarity {min_sim:.3f}</h3>"
            f"{''.join(items)}{more}</div>"
        )
    parts.append("</div>")
    parts.append(_GROUPS_JS)
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
