"""The small interface every embedder implements.

An embedder turns decoded RGB images into L2-normalized float32 vectors. The work is split in
two so that the CPU-heavy part can run in worker processes next to the model:

- ``prepare(image)`` runs per image, in a worker (it must be a pure function of the image and
  the embedder's configuration, and the embedder must be picklable before ``load``);
- ``embed_prepared(batch)`` runs in the main process on a batch of prepared arrays (the model
  forward pass for open_clip; stacking and normalizing for the offline embedder).

Downstream code (clustering, audit) only sees the matrices and ``model_id``/``dim``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class Embedder(Protocol):
    """Embeds decoded RGB images into an (n, dim) float32 matrix of unit-norm rows."""

    @property
    def model_id(self) -> str:
        """Stable identifier of the model and its weights; stored with every vector."""
        ...

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    @property
    def duplicate_threshold(self) -> float:
        """Cosine similarity at or above which two images are calibrated to be near-copies."""
        ...

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Per-image CPU preprocessing of one RGB image (runs in worker processes)."""
        ...

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Embed prepared arrays; returns (len(batch), dim) float32 with unit-norm rows."""
        ...


def embed_images(embedder: Embedder, images: Sequence[Image.Image]) -> np.ndarray:
    """Convenience: prepare and embed in the calling process."""
    if not images:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return embedder.embed_prepared([embedder.prepare(im.convert("RGB")) for im in images])


def l2_normalize(x: np.ndarray, eps: float = 1e-12, dtype: type | None = np.float32) -> np.ndarray:
    """Row-wise L2 normalization (zero rows stay zero), into `dtype` (None: the input's float type).
    The one row normaliser of the package (embedders, k-means, bucket planning, synthetic data)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(x.dtype, copy=False)


def image_text_cosine(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit image and caption vectors of one model (the CLIP score), float32."""
    images, texts = np.asarray(images, np.float32), np.asarray(texts, np.float32)
    if images.shape != texts.shape:
        raise ValueError(f"one caption vector per image vector: {images.shape} vs {texts.shape}")
    return (images * texts).sum(axis=1).astype(np.float32) if images.size else np.zeros(len(images), np.float32)
