"""Regurgitation audit: the nearest training images of each generated image.

Grain: one row per (generated image, rank) for its top-k neighbours over the WHOLE indexed
training set, before deduplication and filtering — a near-copy of a removed image still tells that
the model saw it; `kept_in_filtered` says whether the neighbour survived into the filtered set.

Search: exact top-k by cosine (inner product of L2-normalized vectors), streamed. The training
vectors arrive in batches (the embedding store's `iter_batches`); every generated image keeps a
running top-k that each batch is merged into, so memory holds the generated vectors, one batch and
one (query block × batch) similarity panel — never the corpus, never an index of it.

Exactness and ties: each panel is one GEMM (numpy on the CPU, torch float32 on a GPU) used only
to pick candidates — every entry within `CANDIDATE_MARGIN` of the row's k-th best so far. The
candidates are re-scored in float64 and rounded to float32, so a similarity does not depend on
the device, the batch size or the BLAS kernel, and the top-k is ordered by (similarity descending,
position in the stream ascending): of two training images with the same similarity the one that
comes first in partition-then-row order ranks first, whatever the batching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl

AUDIT_SCHEMA: dict[str, pl.DataType] = {
    "generated": pl.String,
    "prompt": pl.String,
    "rank": pl.Int32,
    "image_id": pl.String,
    "similarity": pl.Float32,
    "flagged": pl.Boolean,
    "kept_in_filtered": pl.Boolean,
    # accepted | undecided:<why> | rejected:<why> (dedup.verify) | not_verified
    "verdict": pl.String,
}

_NORM_TOLERANCE = 1e-3
# How far below the k-th best a GEMM entry may lie and still be re-scored. A float32 GEMM of unit
# vectors errs by < 1e-4 (d ≤ 1,600); even TF32 (10-bit mantissa: < 2⁻¹⁰ per entry, by
# Cauchy–Schwarz), should a caller have enabled it, stays below 1e-3 — and two entries are compared.
CANDIDATE_MARGIN = 2e-3
# Largest (query block × batch) similarity panel, in entries (64 MB of float32).
_PANEL_ENTRIES = 1 << 24


@dataclass(frozen=True)
class AuditConfig:
    """top_k neighbours per generated image; threshold (cosine) at/above which a neighbour is a
    near-copy (resolved by `tables.resolve_threshold`; None = not yet resolved); batch_rows: training vectors read per
    batch; device: "cpu", "cuda[:N]" (resolve "auto" before)."""

    top_k: int = 5
    threshold: float | None = None
    batch_rows: int = 65_536
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (neighbours per generated image), got {self.top_k}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1 (training vectors per batch), got {self.batch_rows}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold is a cosine similarity in [-1, 1] (or None for the embedder's); got {self.threshold}"
            )


@dataclass
class TopK:
    """The running (then final) top-k of every query, best first; unfilled slots have
    sim = -inf, pos = -1, id = None. pos is the position in the training stream."""

    sims: np.ndarray  # (q, k) float32
    pos: np.ndarray  # (q, k) int64
    ids: np.ndarray  # (q, k) object
    searched: int = 0  # training vectors seen

    @classmethod
    def empty(cls, q: int, k: int) -> "TopK":
        return cls(
            np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64), np.full((q, k), None, object)
        )

    def filled(self) -> np.ndarray:
        """(q, k) bool: slots that hold a neighbour."""
        return self.pos >= 0


def _check_normalized(x: np.ndarray, what: str, offset: int = 0) -> None:
    if x.shape[0] == 0:
        return
    norms = np.linalg.norm(x, axis=1)
    # Zero rows are allowed: l2_normalize leaves an all-zero descriptor at zero (similarity 0).
    bad = (np.abs(norms - 1.0) > _NORM_TOLERANCE) & (norms > _NORM_TOLERANCE)
    if bad.any():
        raise ValueError(
            f"{what} vectors must be L2-normalized (cosine = inner product); row "
            f"{offset + int(np.argmax(bad))} has norm {norms[bad][0]:.4f}. Normalize them (embedders do) "
            "before the audit."
        )


class StreamedTopK:
    """Exact top-k of `queries` over training batches fed one at a time with `add`."""

    def __init__(self, queries: np.ndarray, k: int, device: str = "cpu") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be a 2-D array, got shape {q.shape}")
        _check_normalized(q, "generated")
        self.queries = q
        self.k = k
        self.device = device
        self.top = TopK.empty(q.shape[0], k)
        self._torch_queries = None
        if device != "cpu":
            import torch

            self._torch_queries = torch.from_numpy(q).to(device)

    def add(self, ids: Sequence[str], batch: np.ndarray) -> None:
        """Merge one batch of training vectors (rows in stream order) into the running top-k."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or len(ids) != x.shape[0]:
            raise ValueError(f"a batch needs one id per row of a 2-D matrix; got {len(ids)} ids, shape {x.shape}")
        offset = self.top.searched
        if x.shape[0] == 0:
            return
        if self.queries.shape[0] and x.shape[1] != self.queries.shape[1]:
            raise ValueError(
                f"training vectors have dimension {x.shape[1]}, generated ones {self.queries.shape[1]}: "
                "embed both with the same model"
            )
        _check_normalized(x, "training", offset)
        self.top.searched += x.shape[0]
        nq = self.queries.shape[0]
        if nq == 0:
            return
        id_arr = np.asarray(ids, dtype=object)
        block = max(1, _PANEL_ENTRIES // x.shape[0])
        xt = None
        if self._torch_queries is not None:
            import torch

            xt = torch.from_numpy(x).to(self.device)
        for s in range(0, nq, block):
            e = min(nq, s + block)
            rows, cols = self._candidates(s, e, x, xt)
            self._merge(s, e, rows, cols, x, id_arr, offset)

    def _candidates(self, s: int, e: int, x: np.ndarray, xt) -> tuple[np.ndarray, np.ndarray]:
        """(query row within [s, e), batch column) of every entry that may enter the top-k."""
        kk = min(self.k, x.shape[0])
        floor = self.top.sims[s:e, -1]  # the k-th best so far (exact), -inf while unfilled
        if xt is None:
            panel = self.queries[s:e] @ x.T
            kth = np.partition(panel, panel.shape[1] - kk, axis=1)[:, panel.shape[1] - kk]
            cut = np.maximum(kth, floor) - np.float32(CANDIDATE_MARGIN)
            r, c = np.nonzero(panel >= cut[:, None])
        else:
            import torch

            panel = self._torch_queries[s:e] @ xt.T
            kth = torch.topk(panel, kk, dim=1).values[:, -1]
            cut = torch.maximum(kth, torch.from_numpy(floor).to(panel.device)) - CANDIDATE_MARGIN
            nz = torch.nonzero(panel >= cut[:, None]).cpu().numpy()
            r, c = nz[:, 0], nz[:, 1]
        return r.astype(np.int64) + s, c.astype(np.int64)

    def _merge(
        self, s: int, e: int, rows: np.ndarray, cols: np.ndarray, x: np.ndarray, id_arr: np.ndarray, offset: int
    ) -> None:
        # Exact re-scoring: float64 dot products rounded to float32, independent of the GEMM.
        sims = np.einsum(
            "ij,ij->i", self.queries[rows].astype(np.float64), x[cols].astype(np.float64)
        ).astype(np.float32)
        top = self.top
        old_rows = np.repeat(np.arange(s, e), self.k)
        keep = top.pos[s:e].reshape(-1) >= 0
        all_rows = np.concatenate([old_rows[keep], rows])
        all_sims = np.concatenate([top.sims[s:e].reshape(-1)[keep], sims])
        all_pos = np.concatenate([top.pos[s:e].reshape(-1)[keep], cols + offset])
        all_ids = np.concatenate([top.ids[s:e].reshape(-1)[keep], id_arr[cols]])
        order = np.lexsort((all_pos, -all_sims, all_rows))
        all_rows, all_sims, all_pos, all_ids = all_rows[order], all_sims[order], all_pos[order], all_ids[order]
        first = np.searchsorted(all_rows, all_rows, side="left")
        rank = np.arange(all_rows.size) - first
        take = rank < self.k
        r, k = all_rows[take], rank[take]
        top.sims[r, k] = all_sims[take]
        top.pos[r, k] = all_pos[take]
        top.ids[r, k] = all_ids[take]


def streamed_top_k(
    queries: np.ndarray, batches: Iterable[tuple[Sequence[str], np.ndarray]], k: int, device: str = "cpu"
) -> TopK:
    """Exact top-k training neighbours of every query row over a stream of (ids, vectors) batches.

    Rows must be L2-normalized (zero rows allowed). Result ordered by (similarity desc, stream
    position asc); see the module docstring.
    """
    acc = StreamedTopK(queries, k, device)
    for ids, x in batches:
        acc.add(ids, x)
    return acc.top


def audit_table(
    gen_ids: Sequence[str],
    gen_prompts: Sequence[str | None],
    top: TopK,
    kept_ids: Iterable[str],
    threshold: float,
) -> pl.DataFrame:
    """The audit table (AUDIT_SCHEMA), sorted by (generated, rank).

    `top` is the streamed top-k over the whole training set before dedup/filtering; `kept_ids` the
    neighbours (any superset will do) that are in filtered_dataset; `threshold` the resolved cosine.
    """
    if not (len(gen_ids) == len(gen_prompts) == top.sims.shape[0]):
        raise ValueError(
            f"gen_ids ({len(gen_ids)}), gen_prompts ({len(gen_prompts)}) and the top-k "
            f"({top.sims.shape[0]} rows) must have one entry per generated image"
        )
    kept = set(kept_ids)
    rows = []
    for g, gid in enumerate(gen_ids):
        for r in range(top.sims.shape[1]):
            if top.pos[g, r] < 0:
                continue
            tid = str(top.ids[g, r])
            sim = float(top.sims[g, r])
            rows.append((gid, gen_prompts[g], r + 1, tid, sim, sim >= threshold, tid in kept, "not_verified"))
    return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row").sort("generated", "rank")


def apply_verdicts(table: pl.DataFrame, verdicts: dict[tuple[str, str], str], threshold: float) -> pl.DataFrame:
    """The audit table with verification: a (generated, image_id) row with a verdict is flagged when
    accepted, or when undecided and ≥ threshold; rows without one keep `similarity ≥ threshold`."""
    v = [verdicts.get((g, t)) for g, t in zip(table["generated"].to_list(), table["image_id"].to_list())]
    flagged = [
        (s >= threshold) if d is None else (d == "accepted" or (d.startswith("undecided") and s >= threshold))
        for d, s in zip(v, table["similarity"].to_list())
    ]
    return table.with_columns(
        pl.Series("flagged", flagged, pl.Boolean),
        pl.Series("verdict", [d or "not_verified" for d in v], pl.String),
    )


def discover_generated(folder: Path) -> list[tuple[str, Path, str | None]]:
    """(id, path, prompt) for every image under `folder`, nested folders walked, sorted by id.

    id = the path relative to `folder` (POSIX separators); prompt = the stripped text of the
    sidecar `<stem>.txt` beside the image, or None. Hidden files and folders are skipped.
    """
    from dedup_assets.ingest.shards import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"generated-images folder {folder} does not exist or is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            p = Path(dirpath) / fn
            if fn.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            side = p.with_suffix(".txt")
            prompt = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else None
            out.append((p.relative_to(folder).as_posix(), p, prompt))
    return sorted(out, key=lambda t: t[0])
