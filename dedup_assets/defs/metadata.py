"""Small helpers that turn frames and figures into Dagster metadata a person can act on."""


import base64
import io
from pathlib import Path
from typing import Any
from urllib.parse import quote

import polars as pl
from dagster import MetadataValue


def markdown_preview(df: pl.DataFrame, limit: int = 10, max_chars: int = 60) -> MetadataValue:
    """A markdown table of the first rows, with long cells shortened and pipes escaped."""
    head = df.head(limit)
    if head.height == 0:
        return MetadataValue.md("_(no rows)_")

    def cell(v: Any) -> str:
        s = "" if v is None else str(v)
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= max_chars else s[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    if df.height > limit:
        lines.append(f"\n_{df.height - limit} more rows_")
    return MetadataValue.md("\n".join(lines))


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


def counts_md(counts: dict[str, int]) -> MetadataValue:
    if not counts:
        return MetadataValue.md("_(none)_")
    lines = ["| reason | count |", "|---|---|"]
    for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {k} | {v} |")
    return MetadataValue.md("\n".join(lines))


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
