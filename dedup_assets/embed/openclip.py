"""The open_clip embedder: CLIP image embeddings on GPU (fp16) or CPU (fp32).

Weights come from an open_clip pretrained tag (which must already be in the local Hugging Face /
open_clip cache on a machine that cannot reach a model hub) or from a local checkpoint file.
Asking for a tag that is not cached fails at once with `ModelUnavailableError`, whose message says
what to do; nothing ever falls back silently to random weights or another model. Random weights
are allowed only with `allow_random=True` (tests).

The preprocessing transform is built from the model's config without the weights, so `prepare`
runs in worker processes that never load the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

# Cosine at/above which two CLIP image embeddings are treated as near-copies. CLIP puts
# re-encodes, resizes and light crops of one picture above ~0.95 and distinct photos of one
# subject mostly below 0.9; 0.92 sits between (users can override τ on the dedup resource).
CLIP_DUPLICATE_THRESHOLD = 0.92


class ModelUnavailableError(RuntimeError):
    """The requested weights cannot be had on this machine."""


def _hint(what: str) -> str:
    return (
        f"{what}. This machine cannot download weights from a model hub: pass a local checkpoint "
        f"file (`--pretrained /path/to/open_clip_model.safetensors`, or the embedder resource's "
        f"`pretrained` field), pre-populate the Hugging Face cache, or choose the built-in "
        f"embedder (`--embedder offline`)."
    )


@dataclass(frozen=True)
class OpenClipConfig:
    model: str = "ViT-B-32"
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    allow_random: bool = False

    def __post_init__(self) -> None:
        import open_clip

        if self.model not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {self.model!r}; known models include "
                f"{', '.join(sorted(open_clip.list_models())[:12])}, … (open_clip.list_models())"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")


def _cached_weights(model: str, tag: str) -> str | None:
    """Path of the cached weights for an open_clip tag, or None when they are not on disk."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ModelUnavailableError(
            f"open_clip has no pretrained tag {tag!r} for {model!r} "
            f"(known: {open_clip.list_pretrained_tags_by_model(model)})"
        )
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" → ("org/name", "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return target
    return None


def _file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class OpenClipEmbedder:
    """Implements the Embedder protocol with an open_clip image tower."""

    decode_side = 256  # the transform resizes to 224; decoding at >= 256 loses nothing

    def __init__(self, cfg: OpenClipConfig) -> None:
        self.cfg = cfg
        self._model: Any = None
        self._transform: Any = None
        self._device: str | None = None
        self._dtype: Any = None
        self._model_id: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        if self._model_id is None:
            p = self.cfg.pretrained
            if p is None:
                suffix = "random-init"
            elif _is_path(p):
                if not os.path.isfile(p):
                    raise ModelUnavailableError(_hint(f"checkpoint file {p} does not exist"))
                suffix = f"file:{_file_fingerprint(p)}"
            else:
                suffix = p
            self._model_id = f"open_clip/{self.cfg.model}/{suffix}"
        return self._model_id

    @property
    def dim(self) -> int:
        import open_clip

        return int(open_clip.get_model_config(self.cfg.model)["embed_dim"])

    @property
    def duplicate_threshold(self) -> float:
        return CLIP_DUPLICATE_THRESHOLD

    # ------------------------------------------------------------------ loading
    def _resolve_device(self) -> str:
        import torch

        if self.cfg.device == "cuda":
            if not torch.cuda.is_available():
                raise ModelUnavailableError(
                    "device 'cuda' was asked for but no CUDA GPU is visible to torch; use --device cpu or auto"
                )
            return "cuda"
        if self.cfg.device == "cpu":
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _weights(self) -> str | None:
        p = self.cfg.pretrained
        if p is None:
            if not self.cfg.allow_random:
                raise ModelUnavailableError(
                    _hint(f"no weights given for open_clip model {self.cfg.model!r} (random weights are only for tests)")
                )
            return None
        if _is_path(p):
            if not os.path.isfile(p):
                raise ModelUnavailableError(_hint(f"checkpoint file {p} does not exist"))
            return p
        cached = _cached_weights(self.cfg.model, p)
        if cached is None:
            raise ModelUnavailableError(
                _hint(f"the open_clip weights {self.cfg.model}/{p} are not in the local cache")
            )
        return cached

    def load(self) -> None:
        """Build the model once (checks weights first, so a missing model fails before any work)."""
        if self._model is not None:
            return
        import open_clip
        import torch

        weights = self._weights()
        device = self._resolve_device()
        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if device == "cuda" else "fp32"
        torch.manual_seed(0)  # random-init models (tests) are deterministic
        model = open_clip.create_model(self.cfg.model, pretrained=None, device="cpu")
        if weights is not None:
            open_clip.load_checkpoint(model, weights)
        model.eval()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self._model = model.to(device=device, dtype=dtype)
        self._device, self._dtype = device, dtype
        self.model_id  # noqa: B018  (fingerprint the checkpoint now, not in the hot path)

    # ------------------------------------------------------------------ embedding
    def _get_transform(self):  # noqa: ANN202
        if self._transform is None:
            import open_clip

            vision = open_clip.get_model_config(self.cfg.model)["vision_cfg"]
            size = vision.get("image_size", 224)
            pcfg = (
                open_clip.get_pretrained_cfg(self.cfg.model, self.cfg.pretrained)
                if self.cfg.pretrained and not _is_path(self.cfg.pretrained) else {}
            )
            self._transform = open_clip.image_transform(
                size,
                is_train=False,
                mean=pcfg.get("mean") or open_clip.OPENAI_DATASET_MEAN,
                std=pcfg.get("std") or open_clip.OPENAI_DATASET_STD,
            )
        return self._transform

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self._get_transform()(image.convert("RGB")).numpy().astype(np.float32, copy=False)

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        self.load()
        x = torch.from_numpy(np.stack(batch)).to(self._device, dtype=self._dtype, non_blocking=True)
        with torch.inference_mode():
            feats = self._model.encode_image(x).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])
