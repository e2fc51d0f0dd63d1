"""The open_clip path for real, on CPU and offline: a tiny open_clip architecture with random
weights is saved to a checkpoint file and loaded back through the `pretrained=<path>` route."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedup_assets.embed.base import embed_images
from dedup_assets.embed.openclip import ModelUnavailableError, OpenClipConfig, OpenClipEmbedder
from dedup_assets.synth.bases import make_base_images

TINY = "dedup-assets-tiny-vit"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny ViT CLIP config with open_clip (a real open_clip architecture, just small)."""
    import open_clip

    d = tmp_path_factory.mktemp("cfg")
    (d / f"{TINY}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(d / f"{TINY}.json")
    return TINY


@pytest.fixture(scope="module")
def checkpoint(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    torch.manual_seed(123)
    model = open_clip.create_model(tiny_model, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_open_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_local_checkpoint_loads_and_embeds(tiny_model: str, checkpoint: Path) -> None:
    emb = OpenClipEmbedder(OpenClipConfig(model=tiny_model, pretrained=str(checkpoint), device="cpu"))
    emb.load()
    images = [im for _, im in make_base_images(6, seed=2)]
    x = embed_images(emb, images)
    assert x.shape == (6, 32) and x.dtype == np.float32 and emb.dim == 32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    again = embed_images(OpenClipEmbedder(OpenClipConfig(model=tiny_model, pretrained=str(checkpoint))), images)
    np.testing.assert_allclose(x, again, atol=1e-5)  # deterministic, and the weights came from the file
    assert emb.model_id.startswith(f"open_clip/{tiny_model}/file:") and len(emb.model_id.split("file:")[1]) == 12
    # not the random init of the same architecture: the checkpoint's weights were loaded
    rnd = OpenClipEmbedder(OpenClipConfig(model=tiny_model, allow_random=True))
    assert not np.allclose(embed_images(rnd, images), x, atol=1e-3)


def test_prepare_works_without_the_model_and_the_embedder_pickles(tiny_model: str, checkpoint: Path) -> None:
    import pickle

    emb = OpenClipEmbedder(OpenClipConfig(model=tiny_model, pretrained=str(checkpoint)))
    arr = emb.prepare(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32
    emb.load()
    clone = pickle.loads(pickle.dumps(emb))
    assert clone._model is None and clone.prepare(Image.new("RGB", (50, 50))).shape == (3, 64, 64)


def test_hub_tag_not_cached_fails_fast_with_instructions() -> None:
    t0 = time.perf_counter()
    emb = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ModelUnavailableError) as e:
        emb.load()
    assert time.perf_counter() - t0 < 30  # no waiting on network time-outs
    msg = str(e.value)
    assert "--pretrained /path/to/" in msg and "--embedder offline" in msg


def test_no_weights_is_refused_unless_random_is_explicit(tiny_model: str) -> None:
    with pytest.raises(ModelUnavailableError, match="random weights are only for tests"):
        OpenClipEmbedder(OpenClipConfig(model=tiny_model)).load()
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        OpenClipEmbedder(OpenClipConfig(model=tiny_model, pretrained="/nope/ckpt.pt")).load()
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipConfig(model="no-such-model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_a_gpu_errors_clearly(tiny_model: str) -> None:
    with pytest.raises(ModelUnavailableError, match="no CUDA GPU"):
        OpenClipEmbedder(OpenClipConfig(model=tiny_model, allow_random=True, device="cuda")).load()


@pytest.mark.gpu
def test_fp16_on_cuda(tiny_model: str, checkpoint: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    emb = OpenClipEmbedder(OpenClipConfig(model=tiny_model, pretrained=str(checkpoint), device="cuda"))
    emb.load()
    assert emb._dtype == torch.float16
    x = embed_images(emb, [im for _, im in make_base_images(4)])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)
