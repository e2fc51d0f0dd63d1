"""The sample dataset of the demo: a few img2dataset-style shards with planted near-copies.

What it holds (deterministic, ~2 MB):
- three shards: two folders and one WebDataset tar, each with `<key>.jpg|png` + `<key>.txt`
  caption + `<key>.json` ({"url", "caption"});
- base images of four kinds (photo-like scenes, graphics, text, clocks) and near-copies of some
  of them (resized, re-encoded, cropped, flipped, bordered, captioned...), placed in the same and
  in other shards so deduplication has cross-shard groups to find;
- hostile files (zero-byte, truncated, not an image, decompression bomb, CMYK, 16-bit, ...),
  small images and extreme aspect ratios, and bad captions (hashtags, file names, SEO lists,
  another language) so every filter has something to report;
- a folder of "generated" images: near-copies of a few training images (the audit must flag
  them) and novel images (it must not), with a prompt sidecar each.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

GOOD_CAPTIONS = [
    "a quiet landscape with rolling green hills under a pale blue sky",
    "a simple chart with coloured bars on a white background",
    "a page of printed words in a plain black typeface",
    "a round clock on a kitchen wall showing the time",
    "a bright abstract composition of circles and squares",
    "sunset over the hills with warm orange light",
]
BAD_CAPTIONS = [
    "#sunset #beach #love #instagood #photooftheday",
    "IMG_1234.JPG",
    "cheap, best, buy, sale, free shipping, wallpaper, hd, 2024",
    "un paysage tranquille avec des collines vertes sous un ciel bleu",
    "",
]


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def write_sample_dataset(
    out: Path, generated_out: Path | None = None, n_bases: int = 60, seed: int = 7
) -> dict[str, Any]:
    """Write the sample shards under `out` (and generated images under `generated_out`).

    Idempotent: existing files are overwritten with identical bytes. Returns counts.
    """
    from dedup_assets.synth.bases import make_base_images
    from dedup_assets.synth.hostile import hostile_files, write_folder_shard, write_tar_shard
    from dedup_assets.synth.transforms import random_copy

    rng = np.random.default_rng(seed)
    bases = make_base_images(n_bases, seed=seed)
    shard_names = ["00000", "00001", "00002"]
    files: dict[str, dict[str, bytes]] = {s: {} for s in shard_names}
    captions: dict[str, dict[str, str]] = {s: {} for s in shard_names}
    metas: dict[str, dict[str, dict]] = {s: {} for s in shard_names}
    planted = 0

    def put(shard: str, key: str, data: bytes, ext: str, caption: str) -> None:
        files[shard][f"{key}.{ext}"] = data
        captions[shard][key] = caption
        metas[shard][key] = {"url": f"https://example.org/{shard}/{key}.{ext}", "caption": caption}

    for b, (kind, img) in enumerate(bases):
        shard = shard_names[b % 3]
        caption = GOOD_CAPTIONS[b % len(GOOD_CAPTIONS)]
        if b % 11 == 5:
            caption = BAD_CAPTIONS[b % len(BAD_CAPTIONS)]
        put(shard, f"b{b:04d}", _encode(img, "JPEG" if b % 4 else "PNG"), "jpg" if b % 4 else "png", caption)
        if b % 3 == 0:  # a third of the bases get 1-3 near-copies, some in other shards
            for c in range(1 + b % 3 + (b % 2)):
                copy, ops = random_copy(img, rng, n_ops=1 + c % 2)
                target = shard_names[(b + c + 1) % 3] if c % 2 == 0 else shard
                put(target, f"b{b:04d}c{c}", _encode(copy, "JPEG", quality=int(rng.integers(40, 95))), "jpg",
                    f"{caption} ({'+'.join(ops)})")
                planted += 1

    # Small images and extreme aspect ratios for the image filters.
    put("00001", "small0001", _encode(bases[1][1].resize((96, 80)), "JPEG"), "jpg", GOOD_CAPTIONS[0])
    put("00002", "wide0001", _encode(bases[2][1].resize((640, 160)), "JPEG"), "jpg", GOOD_CAPTIONS[1])

    # Hostile files go to the first folder shard.
    for name, data in hostile_files().items():
        files["00000"][f"hostile_{name}"] = data

    out.mkdir(parents=True, exist_ok=True)
    write_folder_shard(out / "00000", files["00000"], captions["00000"], metas["00000"])
    write_folder_shard(out / "00001", files["00001"], captions["00001"], metas["00001"])
    write_tar_shard(out / "00002.tar", files["00002"], captions["00002"], metas["00002"])

    n_generated = 0
    if generated_out is not None:
        generated_out.mkdir(parents=True, exist_ok=True)
        for g, b in enumerate([0, 6, 12]):  # near-copies of training images: must be flagged
            copy, _ = random_copy(bases[b][1], rng, n_ops=1)
            (generated_out / f"copy_{g}.png").write_bytes(_encode(copy, "PNG"))
            (generated_out / f"copy_{g}.txt").write_text(f"prompt: {GOOD_CAPTIONS[b % len(GOOD_CAPTIONS)]}")
            n_generated += 1
        for g, (_, img) in enumerate(make_base_images(4, seed=seed + 1000)):  # novel: must not be
            (generated_out / f"novel_{g}.png").write_bytes(_encode(img, "PNG"))
            (generated_out / f"novel_{g}.txt").write_text("prompt: something new")
            n_generated += 1

    return {
        "shards": len(shard_names),
        "files": sum(len(f) for f in files.values()),
        "planted_copies": planted,
        "generated": n_generated,
        "root": str(out),
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(write_sample_dataset(Path("data/sample"), Path("data/generated"))))
