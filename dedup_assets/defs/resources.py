"""Resources shared by every stage: the warehouse, the dataset location, and the embedder."""


import dataclasses
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource, InitResourceContext, MetadataValue
from pydantic import Field, PrivateAttr

from dedup_assets.embed.base import Embedder
from dedup_assets.ingest.decode import DecodeLimits
from dedup_assets.ingest.shards import ReadLimits
from dedup_assets.settings import Settings
from dedup_assets.warehouse import Warehouse


def config_from(resource: ConfigurableResource, cls: type, **overrides):  # noqa: ANN201
    """A plain config dataclass `cls` filled from the resource's fields of the same names, then
    `overrides` (renamed or converted fields): one place that copies launchpad values into the pure
    modules' configs."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {n: getattr(resource, n) for n in type(resource).model_fields if n in fields}
    return cls(**{**values, **overrides})


class WarehouseResource(ConfigurableResource):
    """The DuckDB file that holds one table per asset."""

    path: str = Field(description="Path of the DuckDB warehouse file.")
    report_base_url: str | None = Field(
        default=None,
        description="URL at which the folder next to the warehouse (<stem>_files/) is served, e.g. "
        "http://127.0.0.1:3001 as `dedup-assets dev` does: review pages and manifests become links in the UI. "
        "None = they are recorded as paths relative to the warehouse's folder.",
    )

    def get(self) -> Warehouse:
        return Warehouse(self.path)

    @property
    def directory(self) -> Path:
        """Folder next to the warehouse for exports, manifests and HTML reports."""
        p = Path(self.path)
        out = p.with_name(p.stem + "_files")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def link(self, path: Path) -> MetadataValue:
        """Metadata for a file under `directory`: a URL under report_base_url, else a relative path."""
        from dedup_assets.defs.metadata import file_link

        return file_link(path, self.directory, self.report_base_url)

    def plot(self, png: bytes, alt: str, name: str) -> MetadataValue:
        """A plot for the asset page, kept as `<stem>_files/plots/<name>.png` (`metadata.plot_metadata`)."""
        from dedup_assets.defs.metadata import plot_metadata

        return plot_metadata(png, alt, self.directory / "plots" / f"{name}.png", self.report_base_url, self.directory)


class DatasetResource(ConfigurableResource):
    """Where the data lives: shards of images, or embeddings made elsewhere (clip-retrieval layout),
    and optionally what a model generated (images, or vectors in the same layout) for the audit."""

    source: str = Field(
        description="Dataset root: one folder or WebDataset tar per shard, or (source_kind "
        "'embeddings') a clip-retrieval folder with img_emb/ and metadata/."
    )
    source_kind: Literal["shards", "embeddings"] = Field(
        default="shards",
        description="'shards' (images; partitions = shards) or 'embeddings' (vectors made elsewhere; "
        "partitions = img_emb_{i}.npy + metadata_{i}.parquet pairs, keyed emb_{i}; no image is read).",
    )
    generated: str | None = Field(
        default=None, description="Folder of images a model generated, for the regurgitation audit."
    )
    generated_embeddings: str | None = Field(
        default=None,
        description="Vectors of generated images in the clip-retrieval layout, audited instead of "
        "`generated` (with source_kind 'embeddings').",
    )
    batch_rows: int = Field(default=65536, description="Vectors per batch when reading external embeddings.")
    max_pixels: int = Field(
        default=89_478_485,
        description="Images above this many pixels are rejected before decoding (bounded memory).",
    )
    min_decodable_side: int = Field(
        default=8, description="Images with a side below this are recorded as too_small."
    )
    index_workers: int = Field(default=2, description="Decode worker processes for the index.")
    max_file_bytes: int = Field(
        default=ReadLimits.max_file_bytes,
        description="Image files above this size are recorded as too_large_file and never read.",
    )
    max_caption_bytes: int = Field(
        default=ReadLimits.max_caption_bytes,
        description="Captions are cut to this many bytes (noted in the row's error); the rest never reaches a model.",
    )
    follow_links: Literal["inside_root", "never"] = Field(
        default="inside_root",
        description="Symbolic links whose target lies inside the dataset root: read them ('inside_root') or not ('never'). Links out of the root are never read.",
    )

    @property
    def root(self) -> Path:
        return Path(self.source)

    @property
    def is_external(self) -> bool:
        """True when the vectors come from elsewhere (no image files)."""
        return self.source_kind == "embeddings"

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_pixels=self.max_pixels, min_side=self.min_decodable_side)

    @property
    def read_limits(self) -> ReadLimits:
        return ReadLimits(
            max_file_bytes=self.max_file_bytes,
            max_caption_bytes=self.max_caption_bytes,
            follow_links=self.follow_links,
        )


class EmbedderResource(ConfigurableResource):
    """The image embedder, chosen by configuration: the built-in offline one or open_clip.

    The model is loaded once per step process, before the first image.
    Asking for open_clip weights that are not available offline fails at once with a message that
    says what to do; there is no silent fallback to another model.
    """

    kind: Literal["offline", "openclip", "external"] = Field(
        default="offline",
        description="'offline' (built in, no weights), 'openclip', or 'external' (vectors made elsewhere, "
        "read from the dataset's embeddings; nothing is embedded here).",
    )
    model_id: str = Field(
        default="external", description="Model id recorded with external vectors (kind 'external')."
    )
    threshold: float | None = Field(
        default=None,
        description="Near-copy cosine τ of dedup and audit for this embedder (--threshold); None = the "
        "embedder's calibrated value. Required for kind 'external'.",
    )
    model: str = Field(default="ViT-B-32", description="open_clip model name.")
    pretrained: str | None = Field(
        default=None,
        description="open_clip pretrained tag (needs a populated cache) or a local checkpoint path.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Where the embedder runs: auto = the first visible CUDA GPU, else the CPU."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="auto = fp16 on GPU, fp32 on CPU."
    )
    batch_size: int = Field(default=64, description="Images per embedding batch.")
    workers: int = Field(default=2, description="Decode/prepare worker processes.")
    allow_random_weights: bool = Field(
        default=False,
        description="Allow an open_clip model with random weights (tests only; never for real data).",
    )
    clip_score: bool = Field(
        default=False,
        description="Also store each image's cosine with its caption, from the same open_clip model's text tower "
        "(table clip_scores; the filter is curate.min_clip_score). Needs kind 'openclip': the offline embedder "
        "has no text tower.",
    )
    on_model_change: Literal["fail", "reset"] = Field(
        default="fail",
        description=(
            "When the warehouse holds vectors of another model: 'fail' with a message, or 'reset' "
            "(delete the other model's vectors so every shard is re-embedded with this one)."
        ),
    )

    _embedder: Embedder | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.kind != "external":  # external vectors: there is no model to load
            self._embedder = self.build()

    def build(self) -> Embedder:
        if self.kind == "external":
            raise RuntimeError(
                "the embedder is 'external': vectors come from the dataset's embeddings folder and no "
                "image can be embedded here; audit generated vectors with --generated-embeddings DIR"
            )
        if self.kind == "offline":
            from dedup_assets.embed.offline import OfflineEmbedder

            return OfflineEmbedder()
        from dedup_assets.embed.openclip import OpenClipConfig, OpenClipEmbedder

        emb = OpenClipEmbedder(config_from(self, OpenClipConfig, allow_random=self.allow_random_weights))
        emb.load()
        return emb

    def get(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self.build()
        return self._embedder

    def recorded_model_id(self) -> str:
        """The model id stored with this embedder's vectors (builds the model unless external)."""
        return self.model_id if self.kind == "external" else self.get().model_id

    def calibrated_threshold(self) -> float | None:
        """The embedder's calibrated near-copy cosine, without loading model weights (None: external)."""
        if self.kind == "external":
            return None
        if self._embedder is not None:
            return float(self._embedder.duplicate_threshold)
        if self.kind == "offline":
            from dedup_assets.embed.offline import OfflineEmbedder

            return float(OfflineEmbedder().duplicate_threshold)
        from dedup_assets.embed.openclip import OpenClipConfig, OpenClipEmbedder

        cfg = OpenClipConfig(model=self.model, pretrained=self.pretrained, allow_random=True)
        return float(OpenClipEmbedder(cfg).duplicate_threshold)


def resources_from_settings(settings: Settings) -> dict[str, ConfigurableResource]:
    """The resource set for one configuration (used by `definitions.py` and the CLI)."""
    external = settings.embeddings is not None
    return {
        "warehouse": WarehouseResource(path=settings.warehouse, report_base_url=settings.report_base_url),
        "dataset": DatasetResource(
            source=settings.embeddings if external else settings.source,
            source_kind="embeddings" if external else "shards",
            generated=settings.generated,
            generated_embeddings=settings.generated_embeddings,
        ),
        "embedder": EmbedderResource(
            kind="external" if external else settings.embedder,  # type: ignore[arg-type]
            model=settings.model,
            pretrained=settings.pretrained,
            device=settings.device,  # type: ignore[arg-type]
            model_id=settings.model_id,
            threshold=settings.threshold,
            clip_score=settings.min_clip_score is not None,
        ),
    }
