"""Small helpers that turn frames and figures into Dagster metadata a person can act on."""


import base64
import io
from pathlib import Path
from typing import Any
from urllib.parse import quote

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema


def _cell(v: Any, max_chars: int) -> str | int | float | bool | None:
    if isinstance(v, float) and v != v:
        return None  # NaN has no JSON form
    if v is None or isinstance(v, (bool, int, float)):
        return v
    text = str(v).replace("\n", " ")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def table_preview(df: pl.DataFrame, limit: int = 10, max_chars: int = 60) -> MetadataValue:
    """The first rows as a table the UI shows inline on the asset page (long cells shortened)."""
    head = df.head(limit)
    schema = TableSchema(columns=[TableColumn(name=c, type=str(t)) for c, t in head.schema.items()])
    records = [TableRecord({k: _cell(v, max_chars) for k, v in row.items()}) for row in head.iter_rows(named=True)]
    return MetadataValue.table(records=records, schema=schema)


def png_markdown(png: bytes, alt: str = "plot") -> MetadataValue:
    """Embed a PNG in markdown metadata (the UI renders data URIs)."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def bar_plot_png(labels: list[str], values: list[float], title: str, xlabel: str = "", ylabel: str = "") -> bytes:
    """A small bar chart as PNG bytes (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    ax.bar(range(len(values)), values, color="#4f6bed")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=45 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center", fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def counts_table(counts: dict[str, int], label: str = "reason") -> MetadataValue:
    """Counts by reason as an inline table, largest first."""
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return table_preview(pl.DataFrame({label: [k for k, _ in rows], "count": [int(v) for _, v in rows]},
                                      schema={label: pl.String, "count": pl.Int64}), limit=len(rows) or 1)


def plot_metadata(png: bytes, alt: str, out: Path, base_url: str | None, directory: Path) -> MetadataValue:
    """A plot on the asset page: written to `out` (under the warehouse's _files folder) and, when the
    folder is served (`base_url`), shown inline by a short markdown image; else embedded as a data URI
    (the UI then opens it from a "[Show Markdown]" link: markdown over 1,000 characters is not inline)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(out)
    if base_url:
        link = file_link(out, directory, base_url)
        return MetadataValue.md(f"![{alt}]({link.value})")
    return png_markdown(png, alt)


def file_link(path: Path, directory: Path, base_url: str | None) -> MetadataValue:
    """A file written under the warehouse's `_files` folder as metadata a person can open: a URL under
    `base_url` when the folder is served (a link in the UI), else its path relative to the folder that
    holds the warehouse (`<stem>_files/…`), never an absolute path of the machine that wrote it."""
    try:
        rel = Path(path).resolve().relative_to(Path(directory).resolve())
    except ValueError:  # not under the folder: say where it is
        return MetadataValue.path(str(path))
    if base_url:
        return MetadataValue.url(base_url.rstrip("/") + "/" + quote(rel.as_posix()))
    return MetadataValue.path((Path(directory).name / rel).as_posix())
