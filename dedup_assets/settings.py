"""Settings read from the environment and the settings file, shared by the Dagster definitions
and the CLI.

Every setting has one environment variable (documented in the README) so that `dagster dev`,
the sensor-launched runs and `dedup-assets run` see the same dataset and warehouse. Every
`dedup-assets run` (and so `dedup-assets demo`) writes the settings it ran with to the settings
file, `$DAGSTER_HOME/dedup_assets.env` (or `./dedup_assets.env` without DAGSTER_HOME, or the path
in `DEDUP_ASSETS_SETTINGS`); `Settings.from_env` reads it under the environment. So the UI that
`make dev` starts after `make demo` materializes with the demo's folders and minimum side.
Precedence: command-line flag > environment variable > settings file > built-in default.
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
ENV_REPORT_BASE_URL = "DEDUP_ASSETS_REPORT_BASE_URL"
ENV_MIN_CLIP_SCORE = "DEDUP_ASSETS_MIN_CLIP_SCORE"
ENV_SETTINGS = "DEDUP_ASSETS_SETTINGS"
SETTINGS_FILE = "dedup_assets.env"

# Settings that may be unset (to_env omits them then)
OPTIONAL_ENV = (ENV_GENERATED, ENV_PRETRAINED, ENV_EMBEDDINGS, ENV_THRESHOLD, ENV_GENERATED_EMBEDDINGS,
                ENV_REPORT_BASE_URL, ENV_MIN_CLIP_SCORE)

DEFAULT_SOURCE = "data/sample"
DEFAULT_WAREHOUSE = "data/warehouse.duckdb"


ALL_ENV = (ENV_SOURCE, ENV_WAREHOUSE, ENV_GENERATED, ENV_EMBEDDER, ENV_MODEL, ENV_PRETRAINED, ENV_DEVICE,
           ENV_MIN_SIDE, ENV_EMBEDDINGS, ENV_MODEL_ID, ENV_THRESHOLD, ENV_GENERATED_EMBEDDINGS,
           ENV_DISCOVERY_CRON, ENV_CORPUS_CRON, ENV_REPORT_BASE_URL, ENV_MIN_CLIP_SCORE)


def settings_file() -> Path:
    """Where the settings file is read and written (module docstring)."""
    explicit = os.environ.get(ENV_SETTINGS)
    if explicit:
        return Path(explicit)
    home = os.environ.get("DAGSTER_HOME")
    return (Path(home) if home else Path.cwd()) / SETTINGS_FILE


def read_settings_file(path: Path | None = None) -> dict[str, str]:
    """KEY=VALUE lines of the settings file ('#' comments, blank lines); {} when it does not exist.
    A line that is not a DEDUP_ASSETS_* setting raises ValueError naming the file and line."""
    path = settings_file() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in ALL_ENV:
            raise ValueError(f"{path}:{no}: expected one of {', '.join(ALL_ENV)} as KEY=VALUE, got {raw!r}")
        out[key] = value.strip()
    return out


def write_settings_file(settings: "Settings", path: Path | None = None) -> Path:
    """Write the settings that reproduce `settings` (atomically) and return the path."""
    path = settings_file() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = settings.to_env()
    env[ENV_DISCOVERY_CRON], env[ENV_CORPUS_CRON] = settings.discovery_cron, settings.corpus_cron
    lines = ["# dedup-assets settings, written by `dedup-assets run`; read by `dagster dev` (the UI) and the CLI.",
             "# Environment variables override these lines; command-line flags override both."]
    lines += [f"{k}={v}" for k, v in sorted(env.items())]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


_FILE: dict[str, str] | None = None


def configured(name: str) -> str | None:
    """A setting's value from the environment, else the settings file, else None."""
    value = os.environ.get(name)
    if value not in (None, ""):
        return value
    value = read_settings_file().get(name)
    return value if value not in (None, "") else None


def _env(name: str, default: str | None) -> str | None:
    value = os.environ.get(name)
    if value not in (None, ""):
        return value
    value = (_FILE or {}).get(name)
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
    report_base_url: str | None = None  # where the warehouse's _files folder is served (review links)
    min_clip_score: float | None = None  # image–caption cosine filter (open_clip only); None = off

    def __post_init__(self) -> None:
        if self.embedder not in ("offline", "openclip"):
            raise ValueError(
                f"embedder must be 'offline' or 'openclip', got {self.embedder!r} "
                f"(set {ENV_EMBEDDER} or --embedder)"
            )
        from dedup_assets.dedup.kernels import validate_device

        if validate_device(self.device).startswith("cuda:"):  # the resources take auto, cuda or cpu
            raise ValueError(f"device {self.device!r}: pick the GPU with CUDA_VISIBLE_DEVICES and use 'cuda'")
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
        if self.min_clip_score is not None:
            if not -1.0 <= self.min_clip_score <= 1.0:
                raise ValueError(f"min_clip_score is a cosine in [-1, 1], got {self.min_clip_score}")
            if self.embedder != "openclip" or self.embeddings:
                raise ValueError(
                    "--min-clip-score needs --embedder openclip: the image–caption cosine comes from the model's "
                    "text tower; the offline embedder has none and external vectors come without one")
        if self.report_base_url and not self.report_base_url.startswith(("http://", "https://")):
            raise ValueError(f"report_base_url must be an http(s) URL, got {self.report_base_url!r}")

    @classmethod
    def from_env(cls, use_file: bool = True) -> "Settings":
        """The settings from the environment over the settings file (use_file=False: environment only)."""
        global _FILE
        _FILE = read_settings_file() if use_file else {}
        try:
            return cls._from_env()
        finally:
            _FILE = None

    @classmethod
    def _from_env(cls) -> "Settings":
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
            report_base_url=_env(ENV_REPORT_BASE_URL, None),
            min_clip_score=float(c) if (c := _env(ENV_MIN_CLIP_SCORE, None)) is not None else None,
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
        if self.report_base_url:
            env[ENV_REPORT_BASE_URL] = self.report_base_url
        if self.min_clip_score is not None:
            env[ENV_MIN_CLIP_SCORE] = repr(self.min_clip_score)
        return env
