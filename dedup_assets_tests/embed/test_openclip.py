"""The open_clip embedder for real, on the CPU and offline.

The smallest architecture in `open_clip.list_models()` that is quick on a CPU, ViT-S-32-alt (43 M
parameters, ~1 s to build), gets random weights, is saved to a checkpoint file and is loaded back
through `pretrained=<path>`; its vectors must equal the in-memory model's own `encode_image`.
"""

from __future__ import annotations

import hashlib
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedup_assets.embed.base import embed_images
from dedup_assets.embed.openclip import (
    CLIP_DUPLICATE_THRESHOLD,
    ModelUnavailableError,
    OpenClipConfig,
    OpenClipEmbedder,
    cached_tag_weights,
)
from dedup_assets.embed.pipeline import embed_stream

SMALL = "ViT-S-32-alt"
TINY = "dedup-assets-test-tiny-vit"  # registered in this process only (see tiny_model)


def _images(n: int, seed: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((160, 120), Image.Resampling.BICUBIC)
        for _ in range(n)
    ]


def _reference(model: torch.nn.Module, images: list[Image.Image]) -> np.ndarray:
    """What the saved model itself says: encode_image on open_clip's eval transform, normalized."""
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(SMALL, pretrained=None)
    x = torch.stack([preprocess(im) for im in images])
    with torch.inference_mode():
        f = model.encode_image(x)
    return torch.nn.functional.normalize(f, dim=-1).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A ViT-S-32-alt with seeded random weights, saved as a safetensors state dict."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = open_clip.create_model(SMALL, pretrained=None).eval()
    path = tmp_path_factory.mktemp("ckpt") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture(scope="module")
def loaded(saved: tuple[Path, torch.nn.Module]) -> OpenClipEmbedder:
    emb = OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained=str(saved[0]), device="cpu", batch_size=8))
    emb.load()
    return emb


def test_checkpoint_file_round_trip_gives_the_saved_models_vectors(
    saved: tuple[Path, torch.nn.Module], loaded: OpenClipEmbedder
) -> None:
    path, model = saved
    images = _images(4)
    x = embed_images(loaded, images + images[:1])
    assert x.shape == (5, 256) and x.dtype == np.float32 and loaded.dim == 256
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(x[:4], _reference(model, images), atol=1e-4)
    # same image → same vector (to float rounding: CPU GEMMs block rows differently within a batch)
    np.testing.assert_allclose(x[4], x[0], atol=1e-6)
    assert loaded.device == "cpu" and loaded.precision == "fp32"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.model_id == f"open_clip/{SMALL}/file:{sha[:16]}"
    assert loaded.duplicate_threshold == CLIP_DUPLICATE_THRESHOLD == 0.92


def test_text_tower_gives_the_saved_models_caption_vectors(
    saved: tuple[Path, torch.nn.Module], loaded: OpenClipEmbedder
) -> None:
    import open_clip

    _, model = saved
    texts = ["a red bicycle against a wall", "", "a red bicycle against a wall", "a page of printed text"]
    t = loaded.embed_texts(texts, batch_size=3)  # batches of 3: the split does not change a vector
    assert t.shape == (4, 256) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(SMALL)(texts[:1])).float()
    np.testing.assert_allclose(t[0], (ref / ref.norm(dim=-1, keepdim=True))[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(t[2], t[0], atol=1e-6)
    assert loaded.embed_texts([]).shape == (0, 256)


def test_same_checkpoint_in_a_new_embedder_is_deterministic(
    saved: tuple[Path, torch.nn.Module], loaded: OpenClipEmbedder
) -> None:
    images = _images(2, seed=5)
    again = OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained=str(saved[0])))
    np.testing.assert_array_equal(embed_images(again, images), embed_images(loaded, images))
    assert again.model_id == loaded.model_id


def test_prepare_needs_no_model_and_the_embedder_pickles_without_it(saved: tuple[Path, torch.nn.Module]) -> None:
    import pickle

    emb = OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained=str(saved[0])))
    arr = emb.prepare(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
    assert emb.device is None  # prepare did not build the model
    clone = pickle.loads(pickle.dumps(emb))
    np.testing.assert_array_equal(clone.prepare(Image.new("RGB", (300, 200), (10, 200, 30))), arr)
    assert clone.dim == 256 and clone.device is None


def test_hub_tag_not_in_the_cache_fails_at_once_without_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip either

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    t0 = time.perf_counter()
    emb = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ModelUnavailableError) as e:
        emb.load()
    # Generous bound: the point is "no HTTP time-outs" (the socket guard above proves no connection).
    assert time.perf_counter() - t0 < 15
    msg = str(e.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in msg and "not in the local cache" in msg
    assert "--pretrained /path/to/open_clip_model.safetensors" in msg and "--embedder offline" in msg


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-33'.*list_models"):
        OpenClipConfig(model="ViT-B-33")
    with pytest.raises(ValueError, match="no pretrained tag 'laion9b' for 'ViT-B-32'.*laion2b_s34b_b79k"):
        OpenClipConfig(model="ViT-B-32", pretrained="laion9b")
    with pytest.raises(ValueError, match="device"):
        OpenClipConfig(model=SMALL, device="tpu")
    with pytest.raises(ValueError, match="precision"):
        OpenClipConfig(model=SMALL, precision="int8")
    with pytest.raises(ModelUnavailableError, match="random weights are only for tests"):
        OpenClipEmbedder(OpenClipConfig(model=SMALL)).load()
    with pytest.raises(ModelUnavailableError, match="does not exist.*--embedder offline"):
        OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained="/nope/ckpt.safetensors")).load()
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        OpenClipEmbedder(OpenClipConfig(model=SMALL, allow_random=True, device="cpu", precision="fp16")).load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_errors_clearly() -> None:
    with pytest.raises(ModelUnavailableError, match="no CUDA GPU.*--device auto"):
        OpenClipEmbedder(OpenClipConfig(model=SMALL, allow_random=True, device="cuda")).load()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ViT CLIP registered with open_clip in THIS process only: workers never see it."""
    from dedup_assets_tests.openclip_helpers import register_tiny_clip

    return register_tiny_clip(tmp_path_factory.mktemp("cfg"), TINY)


def test_pipeline_with_workers_equals_in_process(tiny_model: str) -> None:
    """Workers build the transform from the pickled embedder alone (no model, no registry entry)."""
    emb = OpenClipEmbedder(OpenClipConfig(model=tiny_model, allow_random=True, device="cpu"))
    items = []
    for i, im in enumerate(_images(7, seed=9)):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        items.append((f"im{i}", buf.getvalue()))
    items.insert(2, ("broken", b"\xff\xd8\xff\xe0 not really a jpeg"))
    threads = torch.get_num_threads()
    serial = embed_stream(emb, items, batch_size=3, workers=0, decode_side=emb.decode_side)
    parallel = embed_stream(emb, items, batch_size=3, workers=1, decode_side=emb.decode_side)
    assert torch.get_num_threads() == threads  # capped beside the workers during the run only
    assert parallel.ids == serial.ids == [f"im{i}" for i in range(7)]
    np.testing.assert_array_equal(parallel.vectors, serial.vectors)
    assert serial.vectors.shape == (7, 32)
    assert [f[:2] for f in parallel.failures] == [f[:2] for f in serial.failures] and serial.failures[0][0] == "broken"
    assert emb.model_id == f"open_clip/{tiny_model}/random-init"


@pytest.mark.slow
def test_cached_hub_tag_loads_offline_with_its_quick_gelu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tag whose file is in the HF cache loads without network, with the tag's QuickGELU setting."""
    import huggingface_hub.constants
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(7)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].rstrip("/")
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    assert cached_tag_weights("ViT-B-32", "openai") == str(snap / "open_clip_model.safetensors")
    emb = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", pretrained="openai", device="cpu"))
    images = _images(2)
    x = embed_images(emb, images)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(ref.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
    np.testing.assert_allclose(x, want.numpy(), atol=1e-4)
    assert emb.model_id == "open_clip/ViT-B-32/openai"


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32(saved: tuple[Path, torch.nn.Module]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    images = _images(6)
    half = OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained=str(saved[0]), device="cuda"))
    half.load()
    assert half.device.startswith("cuda:") and half.precision == "fp16"
    full = OpenClipEmbedder(OpenClipConfig(model=SMALL, pretrained=str(saved[0]), device="cuda", precision="fp32"))
    a, b = embed_images(half, images), embed_images(full, images)
    assert a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.999
