"""Write vectors in the clip-retrieval / LAION layout (tests, benchmarks, examples).

    root/img_emb/img_emb_{i}.npy  +  root/metadata/metadata_{i}.parquet  (rows in the same order)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from dedup_assets.ingest.clip_retrieval import META_DIR, NPY_DIR


def write_clip_pair(
    root: str | Path, index: int | str, vectors: np.ndarray, metadata: Mapping[str, Sequence[Any]] | pl.DataFrame,
) -> tuple[Path, Path]:
    """Write one file pair (vectors as given: float16 or float32) and return (npy, parquet)."""
    root = Path(root)
    (root / NPY_DIR).mkdir(parents=True, exist_ok=True)
    (root / META_DIR).mkdir(parents=True, exist_ok=True)
    npy = root / NPY_DIR / f"img_emb_{index}.npy"
    meta = root / META_DIR / f"metadata_{index}.parquet"
    np.save(npy, vectors)
    (metadata if isinstance(metadata, pl.DataFrame) else pl.DataFrame(dict(metadata))).write_parquet(meta)
    return npy, meta


def laion_metadata(n: int, index: int | str, captions: Sequence[str] | None = None) -> pl.DataFrame:
    """Metadata rows like clip-retrieval's: key, image_path, url, caption, plus extra columns."""
    keys = [f"{index}{r:06d}" for r in range(n)]
    return pl.DataFrame(
        {
            "key": keys,
            "image_path": [f"/images/{index}/{k}.jpg" for k in keys],
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "caption": list(captions) if captions is not None else [f"a photo of a red chair number {r}" for r in range(n)],
            "similarity": np.linspace(0.25, 0.35, n).tolist(),
            "LICENSE": ["?"] * n,
        }
    )
