"""The labelling page of a label set: the images the classifier is least sure about, with buttons.

A static page cannot write to DuckDB, so the buttons build a labels file in the browser: "Download
labels" saves `labels_<set>.json` ([{"image_id", "label"}]), which
`dedup-assets label --set <set> --from labels_<set>.json` imports; the next materialization of
`filter_classifiers[<set>]` retrains on them and writes a new page (one active-learning round).
"""

from __future__ import annotations

import json
from pathlib import Path

from dedup_assets.html import Thumbs, anchor, esc, img_tag, page

_JS = """<script>
(function(){
const labels={};
document.querySelectorAll('.member button').forEach(b=>b.onclick=()=>{
  const m=b.closest('.member'); labels[m.dataset.id]=b.dataset.label==='1';
  m.querySelectorAll('button').forEach(x=>x.style.fontWeight=x===b?'bold':'normal');
  document.getElementById('count').textContent=Object.keys(labels).length+' labelled';});
document.getElementById('download').onclick=()=>{
  const rows=Object.entries(labels).map(([image_id,label])=>({image_id,label}));
  const a=document.createElement('a');
  a.href=URL.createObjectURL(new Blob([JSON.stringify(rows)],{type:'application/json'}));
  a.download=document.body.dataset.file; a.click();};
})();
</script>"""


def write_label_page(label_set: str, queue: list[tuple[str, float]], locations: dict[str, str], threshold: float,
                     out: Path, stats: dict) -> Path:
    """Write the page for `label_set`: `queue` = (image_id, score) nearest the threshold first."""
    thumbs = Thumbs(locations, 140)
    file = f"labels_{label_set}.json"
    body = [
        f"<p>{len(queue)} images the classifier is least sure about (score nearest its threshold "
        f"{threshold:.3f}; labels so far: {stats.get('positives', 0)} positive, {stats.get('negatives', 0)} "
        f"negative; cross-validated recall {stats.get('cv_recall', 0):.2f}, precision "
        f"{stats.get('cv_precision', 0):.2f}). Mark each one, then <button id=download>Download labels</button> "
        f"<span id=count>0 labelled</span> and import them: <code>dedup-assets label --set {esc(label_set)} "
        f"--from {esc(file)}</code>.</p><div>",
    ]
    for iid, score in queue:
        body.append(
            f"<div class=member id='{anchor('img', iid)}' data-id='{esc(iid)}'>{img_tag(thumbs(iid), iid)}"
            f"{esc(iid)}<br>score {score:.3f}<br><button data-label=1>remove ({esc(label_set)})</button> "
            "<button data-label=0>keep</button></div>"
        )
    body += ["</div>", _JS]
    html = page(f"Label set {label_set}: next images to label", body)
    html = html.replace("<body>", f"<body data-file='{esc(file)}'>", 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


def read_labels_file(path: Path) -> list[tuple[str, bool]]:
    """(image_id, label) from a page's download ([{"image_id", "label"}]) or a text file of
    `image_id<TAB>1|0` lines; anything else raises ValueError naming the file."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
        return [(str(r["image_id"]), bool(r["label"])) for r in rows]
    except (json.JSONDecodeError, TypeError, KeyError):
        pass
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit("\t", 1)
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise ValueError(f"{path}:{no}: expected JSON from the labelling page or 'image_id<TAB>1|0', got {line!r}")
        out.append((parts[0], parts[1].strip() == "1"))
    return out
