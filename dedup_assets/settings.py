"""Settings read from the environment, shared by the Dagster definitions and the CLI.

Every setting has one environment variable (documented in the README) so that `dagster dev`,
the sensor-launched runs and `dedup-assets run` see the same dataset and warehouse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_SOURCE = "DEDUP_ASSETS_SOURCE"
ENV_WAREHOUSE = "DEDUP_ASSETS_WAREHOUSE"
ENV_GENERATED = "DEDUP_ASSETS_GENERATED"
ENV_EMBEDDER = "DEDUP_ASSETS_EMBEDDER"
ENV_MODEL = "DEDUP_ASSETS_MODEL"
ENV_PRETRAINED = "DEDUP_ASSETS_PRETRAINED"
ENV_DEVICE = "DEDUP_ASSETS_DEVICE"
ENV_MIN_SIDE = "DEDUP_ASSETS_MIN_SIDE"
ENV_EMBEDDINGS = "DEDUP_ASSETS_EMBEDDINGS"
ENV_MODEL_ID = "DEDUP_ASSETS_MODEL_ID"
ENV_THRESHOLD = "DEDUP_ASSETS_THRESHOLD"
ENV_GENERATED_EMBEDDINGS = "DEDUP_ASSETS_GENERATED_EMBEDDINGS"
ENV_DISCOVERY_CRON = "DEDUP_ASSETS_DISCOVERY_CRON"
ENV_CORPUS_CRON = "DEDUP_ASSETS_CORPUS_CRON"

# Settings that may be unset (to_env omits them then)
OPTIONAL_ENV = (ENV_GENERATED, ENV_PRETRAINED, ENV_EMBEDDINGS, ENV_THRESHOLD, ENV_GENERATED_EMBEDDINGS)

DEFAULT_SOURCE = "data/sample"
DEFAULT_WAREHOUSE = "data/warehouse.duckdb"


def _env(name: str, default: str | None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    source: str = DEFAULT_SOURCE
    warehouse: str = DEFAULT_WAREHOUSE
    generated: str | None = None
    embedder: str = "offline"
    model: str = "ViT-B-32"
    pretrained: str | None = None
    device: str = "auto"
    min_side: int = 400
    discovery_cron: str = "*/15 * * * *"
    corpus_cron: str = "0 2 * * *"
    embeddings: str | None = None  # clip-retrieval folder: when set, the source is external vectors
    model_id: str = "external"
    threshold: float | None = None
    generated_embeddings: str | None = None

    def __post_init__(self) -> None:
        if self.embedder not in ("offline", "openclip"):
            raise ValueError(
                f"embedder must be 'offline' or 'openclip', got {self.embedder!r} "
                f"(set {ENV_EMBEDDER} or --embedder)"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.generated_embeddings and not self.embeddings:
            raise ValueError(
                "--generated-embeddings needs --embeddings: generated vectors must come from the same "
                "external model as the training vectors (audit generated images with --generated)"
            )
        if not self.model_id:
            raise ValueError("model_id must not be empty")

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            source=_env(ENV_SOURCE, DEFAULT_SOURCE) or DEFAULT_SOURCE,
            warehouse=_env(ENV_WAREHOUSE, DEFAULT_WAREHOUSE) or DEFAULT_WAREHOUSE,
            generated=_env(ENV_GENERATED, None),
            embedder=_env(ENV_EMBEDDER, "offline") or "offline",
            model=_env(ENV_MODEL, "ViT-B-32") or "ViT-B-32",
            pretrained=_env(ENV_PRETRAINED, None),
            device=_env(ENV_DEVICE, "auto") or "auto",
            min_side=int(_env(ENV_MIN_SIDE, "400") or 400),
            discovery_cron=_env(ENV_DISCOVERY_CRON, "*/15 * * * *") or "*/15 * * * *",
            corpus_cron=_env(ENV_CORPUS_CRON, "0 2 * * *") or "0 2 * * *",
            embeddings=_env(ENV_EMBEDDINGS, None),
            model_id=_env(ENV_MODEL_ID, "external") or "external",
            threshold=float(t) if (t := _env(ENV_THRESHOLD, None)) is not None else None,
            generated_embeddings=_env(ENV_GENERATED_EMBEDDINGS, None),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings (used by the CLI for child processes)."""
        env = {
            ENV_SOURCE: str(Path(self.source)),
            ENV_WAREHOUSE: str(Path(self.warehouse)),
            ENV_EMBEDDER: self.embedder,
            ENV_MODEL: self.model,
            ENV_DEVICE: self.device,
            ENV_MIN_SIDE: str(self.min_side),
        }
        if self.generated:
            env[ENV_GENERATED] = self.generated
        if self.pretrained:
            env[ENV_PRETRAINED] = self.pretrained
        if self.embeddings:
            env[ENV_EMBEDDINGS] = self.embeddings
            env[ENV_MODEL_ID] = self.model_id
        if self.threshold is not None:
            env[ENV_THRESHOLD] = repr(self.threshold)
        if self.generated_embeddings:
            env[ENV_GENERATED_EMBEDDINGS] = self.generated_embeddings
        return env
