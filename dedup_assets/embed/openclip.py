"""The open_clip embedder: CLIP image embeddings on GPU (fp16) or CPU (fp32).

Grain: one unit-norm float32 vector per image.

Weights come from one of two places, never from anywhere else:

- a local checkpoint file (`.pt`/`.pth`/`.bin`/`.safetensors` state dict); its `model_id` carries a
  fingerprint of the file's bytes, so vectors of different weights are never mixed. An
  `open_clip_config.json` next to the file (the Hugging Face layout) supplies its preprocessing
  (mean/std/resize); otherwise open_clip's defaults (OpenAI mean/std, bicubic, shortest side) apply;
- an open_clip pretrained tag (e.g. `laion2b_s34b_b79k`) whose file is ALREADY in the local
  Hugging Face / open_clip cache. The cache is inspected on disk before anything else happens; a tag
  that is not there fails at once with `ModelUnavailableError` (no HTTP request, no time-out), and
  its message says what to do instead. The model is then built from the cached file's path, so
  open_clip has no reason to touch the network either.

Random weights are only possible with `allow_random=True` (tests and benchmarks); nothing ever falls
back silently to random weights or another model.

Everything `prepare` needs (the model's image size and the preprocessing config) is captured when
the embedder is constructed and travels with it when pickled, so worker processes build the
transform without the weights and without open_clip's model registry.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

# Cosine at/above which two CLIP image embeddings count as near-copies. With CLIP ViT-B/32-class
# models, re-encodes, resizes, small crops and light colour edits of one picture stay above ~0.95,
# while different photos of the same subject mostly fall below ~0.90; 0.92 sits in the gap
# (DALL·E 2's dedup clustered CLIP image embeddings the same way). Override τ on the dedup resource
# for other models.
CLIP_DUPLICATE_THRESHOLD = 0.92

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class ModelUnavailableError(RuntimeError):
    """The requested weights (or device) cannot be had on this machine."""


def _hint(what: str) -> str:
    return (
        f"{what}. This machine cannot download weights from a model hub: pass a local checkpoint file "
        f"(`--pretrained /path/to/open_clip_model.safetensors`, or the embedder resource's `pretrained` "
        f"field), put the weights into the local Hugging Face cache beforehand, or choose the built-in "
        f"embedder (`--embedder offline`)."
    )


def is_checkpoint_path(pretrained: str) -> bool:
    """True when `pretrained` names a file rather than an open_clip tag (tags have no '/' or suffix)."""
    return (
        os.path.isfile(pretrained)
        or "/" in pretrained
        or os.sep in pretrained
        or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


@dataclass(frozen=True)
class OpenClipConfig:
    """Which open_clip model, which weights, where and at what precision.

    pretrained: an open_clip tag (weights must be in the local cache) or a path to a checkpoint
    file; None means random weights and needs allow_random=True. precision "auto" is fp16 on cuda
    and fp32 on cpu; fp16 is cuda-only (bf16 works on both).
    """

    model: str = "ViT-B-32"
    pretrained: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    allow_random: bool = False

    def __post_init__(self) -> None:
        import open_clip

        known = open_clip.list_models()
        if self.model not in known:
            close = difflib.get_close_matches(self.model.replace("/", "-"), known, n=5, cutoff=0.6)
            raise ValueError(
                f"unknown open_clip model {self.model!r}. "
                + (f"Did you mean one of {close}? " if close else "")
                + "See open_clip.list_models() for the names (e.g. ViT-B-32, ViT-L-14, ViT-S-32-alt)."
            )
        if self.pretrained is not None:
            if not self.pretrained.strip():
                raise ValueError("pretrained must be an open_clip tag, a checkpoint path or None")
            if not is_checkpoint_path(self.pretrained) and not open_clip.get_pretrained_cfg(
                self.model, self.pretrained
            ):
                raise ValueError(
                    f"open_clip has no pretrained tag {self.pretrained!r} for {self.model!r}; known tags: "
                    f"{open_clip.list_pretrained_tags_by_model(self.model) or 'none'}. "
                    f"For a checkpoint file, pass its path."
                )
        from dedup_assets.dedup.kernels import validate_device

        validate_device(self.device)  # one rule for every device string (also "cuda:N")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def cached_tag_weights(model: str, tag: str) -> str | None:
    """Path of the cached weights file of an open_clip tag, or None; looks on disk only.

    Mirrors the file names open_clip asks the hub for (a .safetensors alternative first), and the
    ~/.cache/clip folder its URL downloads use.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" → ("org/name", "")
        names = [filename] if filename else ["open_clip_pytorch_model.bin"]
        if names[0] == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        elif names[0].endswith((".bin", ".pth")):
            names.insert(0, names[0][:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return target
    return None


def file_fingerprint(path: str, n: int = 16) -> str:
    """First n hex digits of the sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:n]


def _preprocess_cfg(model_cfg: dict, model: str, pretrained: str | None) -> dict:
    """open_clip's eval preprocessing for this model + weights, as a plain (picklable) dict."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), {"size": model_cfg["vision_cfg"].get("image_size", 224)})
    if pretrained is None:
        return cfg
    if not is_checkpoint_path(pretrained):
        import open_clip

        return merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model, pretrained) or {})
    sidecar = Path(pretrained).with_name("open_clip_config.json")
    if sidecar.is_file():
        try:
            overlay = json.loads(sidecar.read_text()).get("preprocess_cfg", {})
        except (OSError, ValueError):
            overlay = {}
        return merge_preprocess_dict(cfg, overlay)
    return cfg


class OpenClipEmbedder:
    """The Embedder protocol over an open_clip image tower (one vector per image).

    Construction is cheap (configs only); `load()` builds the model once. The embedder pickles
    without its model, so it can be handed to worker processes that only call `prepare`.
    """

    decode_side = 256  # the eval transform resizes to 224: decoding a JPEG at >= 256 px loses nothing

    def __init__(self, cfg: OpenClipConfig) -> None:
        import open_clip

        self.cfg = cfg
        model_cfg = open_clip.get_model_config(cfg.model)
        if model_cfg is None:  # registry changed since the config was validated
            raise ValueError(f"unknown open_clip model {cfg.model!r}")
        self._dim = int(model_cfg["embed_dim"])
        self._pp_cfg = _preprocess_cfg(model_cfg, cfg.model, cfg.pretrained)
        self._model: Any = None
        self._transform: Any = None
        self._device: str | None = None
        self._dtype: Any = None
        self._autocast: Any = None
        self._precision: str | None = None
        self._model_id: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        """open_clip/<model>/<tag> | .../file:<sha256 prefix> | .../random-init."""
        if self._model_id is None:
            p = self.cfg.pretrained
            if p is None:
                suffix = "random-init"
            elif is_checkpoint_path(p):
                if not os.path.isfile(p):
                    raise ModelUnavailableError(_hint(f"checkpoint file {p} does not exist"))
                suffix = f"file:{file_fingerprint(p)}"
            else:
                suffix = p
            self._model_id = f"open_clip/{self.cfg.model}/{suffix}"
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def duplicate_threshold(self) -> float:
        return CLIP_DUPLICATE_THRESHOLD

    @property
    def device(self) -> str | None:
        """The device the model runs on ('cuda:N'/'cpu'), None before load()."""
        return self._device

    @property
    def precision(self) -> str | None:
        """The resolved precision ('fp32'/'fp16'/'bf16'), None before load()."""
        return self._precision

    # ------------------------------------------------------------------ loading
    def _resolve_device(self) -> str:
        """"cpu" or this process's GPU "cuda:N" (`kernels.resolve_device`: one GPU per process)."""
        from dedup_assets.dedup.kernels import resolve_device

        try:
            return resolve_device(self.cfg.device)
        except RuntimeError as exc:
            raise ModelUnavailableError(
                "device 'cuda' was asked for, but torch sees no CUDA GPU on this machine "
                f"({exc}); use device 'cpu' or 'auto' (`--device auto`)"
            ) from exc

    def _weights(self) -> tuple[str | None, bool]:
        """(checkpoint path or None for random init, quick_gelu needed); raises before any work."""
        p = self.cfg.pretrained
        if p is None:
            if not self.cfg.allow_random:
                raise ModelUnavailableError(
                    _hint(
                        f"no weights were given for open_clip model {self.cfg.model!r} (random weights "
                        f"are only for tests: allow_random=True)"
                    )
                )
            return None, False
        if is_checkpoint_path(p):
            if not os.path.isfile(p):
                raise ModelUnavailableError(_hint(f"checkpoint file {p} does not exist"))
            return p, False
        import open_clip

        cached = cached_tag_weights(self.cfg.model, p)
        if cached is None:
            raise ModelUnavailableError(
                _hint(f"the weights of open_clip {self.cfg.model}/{p} are not in the local cache")
            )
        # Tags trained with QuickGELU (e.g. "openai") need it in the architecture; open_clip only
        # warns about a mismatch, which would give wrong vectors without an error.
        return cached, bool((open_clip.get_pretrained_cfg(self.cfg.model, p) or {}).get("quick_gelu"))

    def load(self) -> None:
        """Build the model once; weights and device are checked first, so failures come before work."""
        if self._model is not None:
            return
        import contextlib

        import open_clip
        import torch

        weights, quick_gelu = self._weights()
        device = self._resolve_device()
        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if device.startswith("cuda") else "fp32"
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on the CPU")
        model_id = self.model_id  # fingerprint the checkpoint now, not in the hot path
        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
            torch.manual_seed(0)  # random-init models (tests, benchmarks) are reproducible
            model = open_clip.create_model(
                self.cfg.model, pretrained=weights, device="cpu", force_quick_gelu=quick_gelu
            ).eval()
        if device.startswith("cuda") and precision in ("fp16", "bf16"):
            # Half-precision weights: CLIP inference is routinely run this way and it halves memory
            # traffic; autocast below keeps any op that wants fp32 (norms, softmax) in fp32.
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            model = model.to(device=device, dtype=dtype)
            self._autocast = lambda: torch.autocast("cuda", dtype=dtype)
        elif precision == "bf16":  # CPU: fp32 weights, bf16 matmuls through autocast
            dtype = torch.float32
            model = model.to(device)
            self._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            dtype = torch.float32
            model = model.to(device)
            self._autocast = contextlib.nullcontext
        self._model, self._device, self._dtype, self._model_id = model, device, dtype, model_id
        self._precision = precision

    # ------------------------------------------------------------------ embedding
    def _get_transform(self):  # noqa: ANN202
        if self._transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**self._pp_cfg), is_train=False)
        return self._transform

    def prepare(self, image: Image.Image) -> np.ndarray:
        """open_clip's eval transform of one RGB image → float32 (3, S, S); needs no model."""
        return self._get_transform()(image.convert("RGB")).numpy().astype(np.float32, copy=False)

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """encode_image on a batch (loads the model on first use) → (n, dim) float32, unit rows."""
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        self.load()
        # The pipeline hands over one (n, 3, S, S) array: use it as is instead of re-stacking rows.
        x = np.ascontiguousarray(batch, dtype=np.float32) if isinstance(batch, np.ndarray) else np.stack(batch)
        t = torch.from_numpy(x).to(self._device, non_blocking=True).to(self._dtype)
        with torch.inference_mode(), self._autocast():
            feats = self._model.encode_image(t).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """encode_text of the same model (its tokenizer, its text tower) → (n, dim) float32, unit rows:
        the other half of the image–text cosine (CLIP score)."""
        import open_clip
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        self.load()
        tokenizer = open_clip.get_tokenizer(self.cfg.model)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer([t or "" for t in texts[start:start + batch_size]]).to(self._device)
            with torch.inference_mode(), self._autocast():
                feats = torch.nn.functional.normalize(self._model.encode_text(tokens).float(), dim=-1)
            out.append(feats.cpu().numpy().astype(np.float32, copy=False))
        return np.concatenate(out)

    def __getstate__(self) -> dict:
        # The model stays behind: workers only need the configs to build the transform.
        return {"cfg": self.cfg, "dim": self._dim, "pp_cfg": self._pp_cfg, "model_id": self._model_id}

    def __setstate__(self, state: dict) -> None:
        self.cfg = state["cfg"]
        self._dim, self._pp_cfg, self._model_id = state["dim"], state["pp_cfg"], state["model_id"]
        self._model = self._transform = self._device = self._dtype = self._autocast = self._precision = None
