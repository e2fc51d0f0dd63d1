"""The embedding pipeline: parallel equals serial, bad bytes become failure rows, progress is reported."""

from __future__ import annotations

import io

import numpy as np

from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.synth.bases import make_base_images
from dedup_assets.synth.hostile import hostile_files


def _items() -> list[tuple[str, bytes]]:
    out = []
    for n, (_, img) in enumerate(make_base_images(20, seed=8)):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((f"img{n:02d}", buf.getvalue()))
    h = hostile_files()
    out.insert(3, ("bad-truncated", h["truncated.jpg"]))
    out.insert(7, ("bad-text", h["text_named.jpg"]))
    out.append(("bad-empty", b""))
    return out


def test_parallel_equals_serial_and_failures_are_recorded() -> None:
    emb = OfflineEmbedder()
    items = _items()
    calls: list[int] = []
    serial = embed_stream(emb, items, batch_size=4, workers=0)
    parallel = embed_stream(emb, iter(items), batch_size=4, workers=2, progress=lambda n, s: calls.append(n), progress_every=5)
    assert serial.ids == parallel.ids == [i for i, _ in items if not i.startswith("bad")]
    np.testing.assert_allclose(serial.vectors, parallel.vectors, atol=1e-6)
    assert sorted((f[0], f[1]) for f in serial.failures) == [
        ("bad-empty", "empty_file"), ("bad-text", "not_an_image"), ("bad-truncated", "truncated")
    ]
    assert sorted(parallel.failures) == sorted(serial.failures)
    assert calls and calls[-1] == 20 and parallel.images_per_s > 0


def test_empty_input() -> None:
    res = embed_stream(OfflineEmbedder(), [], workers=0)
    assert res.ids == [] and res.vectors.shape == (0, 512)
