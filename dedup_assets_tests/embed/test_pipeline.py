"""The embedding pipeline: the parallel path equals the in-process one, bad bytes become failure rows
without losing good rows, progress is reported, shared-memory blocks are not leaked."""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from dedup_assets.embed.base import l2_normalize
from dedup_assets.embed.pipeline import EmbedResult, embed_stream


class ThumbEmbedder:
    """Test-only embedder: the image's 8×8 RGB thumbnail, L2-normalized (192 dimensions).

    `pad` makes `prepare` return a larger array (the thumbnail zero-padded to pad×pad), so a batch
    exceeds the size above which the pipeline moves prepared arrays through shared memory.
    """

    def __init__(self, pad: int = 0) -> None:
        self.pad = pad

    model_id = "test/thumb8"
    dim = 192
    duplicate_threshold = 0.99

    def prepare(self, image: Image.Image) -> np.ndarray:
        if image.width > 4 * image.height:  # a deliberate prepare() failure for the tests
            raise ValueError("panoramas are not supported")
        thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float32)
        chw = thumb.transpose(2, 0, 1) / 255.0
        if not self.pad:
            return chw
        out = np.zeros((3, self.pad, self.pad), np.float32)
        out[:, :8, :8] = chw
        return out

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack([np.asarray(b)[:, :8, :8] for b in batch]).reshape(len(batch), -1)
        return l2_normalize(x)


def _image(rng: np.random.Generator, size: tuple[int, int] = (96, 80)) -> Image.Image:
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _items(n_good: int = 30, seed: int = 8) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """n_good decodable JPEG/PNG files with bad ones interleaved; returns (items, bad id → reason)."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, bytes]] = []
    for i in range(n_good):
        img = _image(rng)
        if i % 5 == 4:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            items.append((f"good{i:02d}", buf.getvalue()))
        else:
            items.append((f"good{i:02d}", _jpeg(img)))
    whole = _jpeg(_image(rng, (256, 256)))
    bad = {
        "bad-truncated": (whole[: len(whole) // 3], "truncated"),
        "bad-garbage": (b"GIF? no: just some bytes that are not an image" * 3, "not_an_image"),
        "bad-empty": (b"", "empty_file"),
        "panorama": (_jpeg(_image(rng, (400, 40))), "prepare_failed"),
    }
    for pos, (image_id, (data, _)) in zip((0, 7, 13, len(items)), bad.items()):
        items.insert(pos, (image_id, data))
    return items, {k: reason for k, (_, reason) in bad.items()}


def _reference(items: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray]:
    """Known answer computed without the pipeline: PIL decode + thumbnail of every good file."""
    emb = ThumbEmbedder()
    ids, rows = [], []
    for image_id, data in items:
        if image_id.startswith("good"):
            ids.append(image_id)
            rows.append(emb.prepare(Image.open(io.BytesIO(data)).convert("RGB")))
    return ids, emb.embed_prepared(rows)


def _shm_blocks(nbytes: int) -> set[str]:
    """Shared-memory blocks of exactly this size (other tests running beside us use other sizes)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    found = set()
    for name in os.listdir("/dev/shm"):
        try:
            if os.stat(os.path.join("/dev/shm", name)).st_size == nbytes:
                found.add(name)
        except OSError:  # unlinked while we looked
            pass
    return found


def test_serial_result_matches_known_answer_and_records_failures() -> None:
    items, bad = _items()
    calls: list[tuple[int, float]] = []
    res = embed_stream(
        ThumbEmbedder(), items, batch_size=4, workers=0, progress=lambda n, s: calls.append((n, s)), progress_every=10
    )
    ids, expected = _reference(items)
    assert isinstance(res, EmbedResult)
    assert res.ids == ids and len(ids) == 30  # every good row kept, in input order
    assert res.vectors.dtype == np.float32 and res.vectors.shape == (30, 192)
    np.testing.assert_allclose(res.vectors, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    assert [(i, r) for i, r, _ in res.failures] == list(bad.items())  # input order, decode reasons
    assert all(err for _, _, err in res.failures)
    counts = [n for n, _ in calls]
    assert counts == sorted(counts) and counts[-1] == 30 and len(counts) >= 3  # every 10, then the end
    assert res.seconds > 0 and res.images_per_s == pytest.approx(30 / res.seconds)


def test_parallel_equals_serial() -> None:
    items, _ = _items(seed=9)
    serial = embed_stream(ThumbEmbedder(), items, batch_size=3, workers=0)
    calls: list[int] = []
    parallel = embed_stream(
        ThumbEmbedder(), iter(items), batch_size=3, workers=2, progress=lambda n, s: calls.append(n), progress_every=7
    )
    assert parallel.ids == serial.ids
    assert np.array_equal(parallel.vectors, serial.vectors)
    assert [f[:2] for f in parallel.failures] == [f[:2] for f in serial.failures]  # texts may hold addresses
    assert calls and calls[-1] == len(serial.ids) == 30


def test_large_prepared_arrays_travel_through_shared_memory_without_leaks() -> None:
    # 3×200×200 float32 = 480 KB per image: batches of 4 are above the shared-memory threshold.
    items, _ = _items(n_good=20, seed=10)
    block = 4 * 3 * 200 * 200 * 4
    before = _shm_blocks(block)
    # (the worker-side packing really does choose a shared block for such a chunk)
    from dedup_assets.embed import pipeline

    packed = pipeline._prepare_chunk(ThumbEmbedder(pad=200), items[1:5], None, shm_reserve=8)
    if os.path.isdir("/dev/shm"):
        assert isinstance(packed.arrays, pipeline._SharedArray) and packed.arrays.shape == (4, 3, 200, 200)
    pipeline._discard(packed)
    serial = embed_stream(ThumbEmbedder(pad=200), items, batch_size=4, workers=0)
    parallel = embed_stream(ThumbEmbedder(pad=200), items, batch_size=4, workers=2)
    assert parallel.ids == serial.ids and len(serial.ids) == 20
    assert np.array_equal(parallel.vectors, serial.vectors)
    assert [f[:2] for f in parallel.failures] == [f[:2] for f in serial.failures]  # texts may hold addresses
    assert _shm_blocks(block) <= before  # every block the workers made was unlinked


def test_offline_embedder_parallel_equals_serial() -> None:
    from dedup_assets.embed.offline import OfflineEmbedder

    items, bad = _items(n_good=12, seed=11)
    emb = OfflineEmbedder()
    side = emb.decode_side
    serial = embed_stream(emb, items, batch_size=5, workers=0, decode_side=side)
    parallel = embed_stream(emb, items, batch_size=5, workers=2, decode_side=side)
    assert serial.ids == parallel.ids == [i for i, _ in items if i.startswith("good") or i == "panorama"]
    assert serial.vectors.shape == (13, emb.dim)
    assert np.array_equal(serial.vectors, parallel.vectors)
    # the offline embedder has no panorama rule: only the three undecodable files fail
    assert [(i, r) for i, r, _ in serial.failures] == [(k, v) for k, v in bad.items() if v != "prepare_failed"]


def test_empty_input_and_all_bad_input() -> None:
    res = embed_stream(ThumbEmbedder(), [], workers=0)
    assert res.ids == [] and res.vectors.shape == (0, 192) and res.failures == []
    res = embed_stream(ThumbEmbedder(), [("a", b""), ("b", b"xx")], workers=0)
    assert res.ids == [] and res.vectors.shape == (0, 192)
    assert [r for _, r, _ in res.failures] == ["empty_file", "not_an_image"]


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="workers"):
        embed_stream(ThumbEmbedder(), [], workers=-1)
    with pytest.raises(ValueError, match="batch_size"):
        embed_stream(ThumbEmbedder(), [], batch_size=0)


class FailsOnSecondBatch(ThumbEmbedder):
    """Test-only: the model 'fails' on its second batch (errors of the embedder itself must raise)."""

    def embed_prepared(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("model failed on batch 2")
        return super().embed_prepared(batch)


def test_an_embedder_error_propagates_and_leaves_no_shared_blocks() -> None:
    items, _ = _items(n_good=24, seed=12)
    block = 4 * 3 * 200 * 200 * 4
    before = _shm_blocks(block)
    with pytest.raises(RuntimeError, match="model failed on batch 2"):
        embed_stream(FailsOnSecondBatch(pad=200), items, batch_size=4, workers=2)
    assert _shm_blocks(block) <= before  # the chunks still in flight were unlinked too
