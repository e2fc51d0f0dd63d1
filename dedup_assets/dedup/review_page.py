"""The duplicate-groups review page.

One row of thumbnails per duplicate group (keeper outlined), with a small inline script to re-sort
by size or by loosest member and a similarity slider — starting at the lowest similarity an edge
can have — that dims members below it and hides groups left without a duplicate, to tune τ by eye.
Members that a generated image matched (from an audit frame) carry a badge linking to the audit
page, and the page links to the audit page, which links its training images back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from dedup_assets.html import Thumbs, anchor, esc, img_tag, page, shorten

GROUPS_PAGE = "duplicate_groups.html"
_MAX_MEMBERS_SHOWN = 16


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
    return f"<br><span class=verdict>{esc(text)}{esc(extra)}</span>"


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
    tau: float | None = None,
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
    `tau`: the lowest similarity a duplicate edge can have (τ, or the verification band's floor) —
    where the slider starts, so the page opens on the groups as built.
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
    if tau is not None:
        lowest = min(lowest, tau)
    slider_min = max(-1.0, min(0.99, int(lowest * 100) / 100))
    start = slider_min if tau is None else tau
    thumbs = Thumbs(locations, 120)
    parts = [
        f"<p>{summary.height} groups holding {g.height} images; showing {shown.height}. The keeper is "
        "outlined in green; the number under each image is its cosine similarity to the keeper.</p>",
        "<div class=controls>Sort: <button id=bysize>largest first</button> "
        "<button id=bysim>loosest first</button> &nbsp; τ "
        f"<input type=range min='{slider_min:.2f}' max='1' step='0.001' value='{start:.3f}' id=tau> "
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
                    f"<br><a class=badge href='{esc(link)}'>{esc(text)}</a>"
                    if link
                    else f"<br><span class=badge>{esc(text)}</span>"
                )
            cap = captions.get(iid)
            items.append(
                f"<div id='{anchor('img', iid)}' class='member{' keeper' if m['is_keeper'] else ''}' "
                f"data-sim='{m['sim']:.4f}' data-keeper='{1 if m['is_keeper'] else 0}'>"
                f"{_matched(img_tag(thumbs(iid), iid), verdicts.get(iid) if verdicts else None)}"
                f"{esc(iid)}{' (keeper)' if m['is_keeper'] else ''}<br>"
                f"{m['sim']:.3f}{badge}{_verdict_line(verdicts.get(iid) if verdicts else None)}"
                f"{'<br><span class=cap>' + esc(shorten(cap)) + '</span>' if cap else ''}</div>"
            )
        # Members beyond the shown ones still count towards the slider's totals.
        rest = ",".join(f"{s:.4f}" for s in rows.slice(_MAX_MEMBERS_SHOWN)["sim"].to_list())
        more = f"<div class=member>… {size - _MAX_MEMBERS_SHOWN} more</div>" if size > _MAX_MEMBERS_SHOWN else ""
        parts.append(
            f"<div class=group id='{anchor('group', gid)}' data-size='{size}' data-min='{min_sim:.4f}' "
            f"data-rest='{rest}'><h3>group {esc(gid)} — {size} images, lowest similarity {min_sim:.3f}</h3>"
            f"{''.join(items)}{more}</div>"
        )
    parts.append("</div>")
    parts.append(_GROUPS_JS)
    links = {"regurgitation audit": audit_page} if audit_page else None
    out.write_text(page("Duplicate groups", parts, links), encoding="utf-8")
    return out
