"""The regurgitation audit as a page and as markdown.

- `write_audit_html`: one table row per generated image — its thumbnail and prompt, then its
  nearest training images with similarity, flagged (near-copy) images first; each training image
  links to its entry on the duplicate-groups page when one is given.
- `best_matches`: the best match of each generated image, for Dagster metadata.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dedup_assets.html import Thumbs, anchor, esc, img_tag, page, shorten, thumbnail_data_uri

AUDIT_PAGE = "regurgitation_audit.html"


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
    "duplicate_groups.html"), the page links to it and each training image links to its entry there.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbs(train_locations, 160)
    body: list[str] = []
    if audit.height == 0:
        body.append("<p>No generated images were audited.</p>")
    else:
        flagged_gen = set(audit.filter(pl.col("flagged"))["generated"].to_list())
        n_gen = audit["generated"].n_unique()
        body.append(
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
                f"<td id='{anchor('gen', g)}'>{img_tag(gen_uri, g)}<b>{esc(g)}</b><br>"
                f"<span class='cap'>{esc(shorten(prompt))}</span></td>"
            ]
            for r in rows.iter_rows(named=True):
                tid = r["image_id"]
                name = esc(tid)
                if groups_page:
                    name = f"<a href='{esc(groups_page)}#{anchor('img', tid)}'>{name}</a>"
                verdict = r.get("verdict")
                verdict = None if verdict == "not_verified" else verdict
                cells.append(
                    f"<td{' class=flag' if r['flagged'] else ''}>{img_tag(thumbs(tid), tid)}"
                    f"#{int(r['rank'])} {name}<br>similarity {float(r['similarity']):.3f}"
                    f"{' <b>FLAGGED</b>' if r['flagged'] else ''}<br>"
                    f"{'kept in filtered set' if r['kept_in_filtered'] else 'not in filtered set'}"
                    f"{'<br><span class=verdict>' + esc(verdict) + '</span>' if verdict else ''}</td>"
                )
            body.append("<tr>" + "".join(cells) + "</tr>")
        body.append("</table>")
    links = {"duplicate groups": groups_page} if groups_page else None
    out.write_text(page("Regurgitation audit", body, links), encoding="utf-8")
    return out


def best_matches(audit: pl.DataFrame) -> pl.DataFrame:
    """The best match of each generated image, flagged first, then by similarity (for Dagster metadata)."""
    return (
        audit.filter(pl.col("rank") == 1)
        .sort(["flagged", "similarity", "generated"], descending=[True, True, False])
        .select("generated", pl.col("image_id").alias("nearest_training_image"),
                pl.col("similarity").cast(pl.Float64).round(3), "flagged", pl.col("kept_in_filtered").alias("kept"), "verdict")
    )
