"""The two synthetic datasets the project ships, built from the same pieces (bases, transforms,
hostile files, folder/tar shard writers, a generated-images folder):

- `sample_dataset`: the demo's (`dedup-assets sample|demo`, deterministic, ~2 MB). Three shards —
  two folders and one WebDataset tar, each with `<key>.jpg|png` + `<key>.txt` caption + `<key>.json`
  ({"url", "caption"}); base images of four kinds (photo-like scenes, graphics, text, clocks) and
  near-copies of a third of them (resized, re-encoded, cropped, flipped, bordered, captioned...) in the
  same and in other shards; hostile files (zero-byte, truncated, not an image, decompression bomb,
  CMYK, 16-bit, ...), small images, extreme aspect ratios and bad captions (hashtags, file names,
  SEO lists, another language) so every filter has something to report; a generated folder with
  near-copies of three training images (the audit must flag them) and four novel images.
- `small_dataset`: the tests' (two shards, a folder and a tar; mild copies only, some across
  shards; three hostile files; two generated copies and two novel images), with the answers the
  tests check against.

Both return a `SyntheticDataset`: where the files are and what was planted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
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


@dataclass
class SyntheticDataset:
    root: Path
    generated: Path | None
    shards: list[str]
    planted: dict[str, str]  # copy image_id -> base image_id
    hostile: dict[str, str]  # image_id -> expected status (the hostile files whose status is known)
    generated_copies: list[str]
    generated_novel: list[str]
    files: int = 0

    def counts(self) -> dict[str, Any]:
        return {
            "shards": len(self.shards),
            "files": self.files,
            "planted_copies": len(self.planted),
            "generated": len(self.generated_copies) + len(self.generated_novel),
            "root": str(self.root),
        }


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class _Shards:
    """Files, captions and sidecar metadata per shard, written as folders or tars at the end."""

    names: list[str]
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    captions: dict[str, dict[str, str]] = field(default_factory=dict)
    metas: dict[str, dict[str, dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.names:
            self.files[s], self.captions[s], self.metas[s] = {}, {}, {}

    def put(self, shard: str, name: str, data: bytes, caption: str | None = None, meta: dict | None = None) -> None:
        self.files[shard][name] = data
        key = name.rsplit(".", 1)[0]
        if caption is not None:
            self.captions[shard][key] = caption
        if meta is not None:
            self.metas[shard][key] = meta

    def write(self, root: Path, tars: set[str]) -> int:
        from dedup_assets.synth.hostile import write_folder_shard, write_tar_shard

        root.mkdir(parents=True, exist_ok=True)
        for s in self.names:
            if s in tars:
                write_tar_shard(root / f"{s}.tar", self.files[s], self.captions[s], self.metas[s])
            else:
                write_folder_shard(root / s, self.files[s], self.captions[s], self.metas[s])
        return sum(len(f) for f in self.files.values())


def _write_generated(out: Path, items: list[tuple[str, bytes, str | None]]) -> list[str]:
    """Generated images (name, bytes, prompt or None) with a `<stem>.txt` prompt sidecar each."""
    out.mkdir(parents=True, exist_ok=True)
    for name, data, prompt in items:
        (out / name).write_bytes(data)
        if prompt is not None:
            (out / f"{Path(name).stem}.txt").write_text(prompt)
    return [name for name, _, _ in items]


def sample_dataset(out: Path, generated_out: Path | None = None, n_bases: int = 60, seed: int = 7) -> SyntheticDataset:
    """Write the demo's sample shards under `out` (and generated images under `generated_out`).
    Idempotent: existing files are overwritten with identical bytes."""
    from dedup_assets.synth.bases import make_base_images
    from dedup_assets.synth.hostile import hostile_files
    from dedup_assets.synth.transforms import random_copy

    rng = np.random.default_rng(seed)
    bases = make_base_images(n_bases, seed=seed)
    shards = _Shards(["00000", "00001", "00002"])
    planted: dict[str, str] = {}

    def put(shard: str, key: str, data: bytes, ext: str, caption: str) -> None:
        shards.put(shard, f"{key}.{ext}", data, caption, {"url": f"https://example.org/{shard}/{key}.{ext}", "caption": caption})

    for b, (_, img) in enumerate(bases):
        shard = shards.names[b % 3]
        caption = GOOD_CAPTIONS[b % len(GOOD_CAPTIONS)]
        if b % 11 == 5:
            caption = BAD_CAPTIONS[b % len(BAD_CAPTIONS)]
        put(shard, f"b{b:04d}", encode(img, "JPEG" if b % 4 else "PNG"), "jpg" if b % 4 else "png", caption)
        if b % 3 == 0:  # a third of the bases get 1-3 near-copies, some in other shards
            for c in range(1 + b % 3 + (b % 2)):
                copy, ops = random_copy(img, rng, n_ops=1 + c % 2)
                target = shards.names[(b + c + 1) % 3] if c % 2 == 0 else shard
                put(target, f"b{b:04d}c{c}", encode(copy, "JPEG", quality=int(rng.integers(40, 95))), "jpg",
                    f"{caption} ({'+'.join(ops)})")
                planted[f"{target}/b{b:04d}c{c}"] = f"{shard}/b{b:04d}"

    # Small images and extreme aspect ratios for the image filters.
    put("00001", "small0001", encode(bases[1][1].resize((96, 80))), "jpg", GOOD_CAPTIONS[0])
    put("00002", "wide0001", encode(bases[2][1].resize((640, 160))), "jpg", GOOD_CAPTIONS[1])
    for name, data in hostile_files().items():  # hostile files go to the first folder shard
        shards.put("00000", f"hostile_{name}", data)
    n_files = shards.write(out, tars={"00002"})

    copies: list[str] = []
    novel: list[str] = []
    if generated_out is not None:
        items = []
        for g, b in enumerate([0, 6, 12]):  # near-copies of training images: must be flagged
            copy, _ = random_copy(bases[b][1], rng, n_ops=1)
            items.append((f"copy_{g}.png", encode(copy, "PNG"), f"prompt: {GOOD_CAPTIONS[b % len(GOOD_CAPTIONS)]}"))
        copies = _write_generated(generated_out, items)
        novel = _write_generated(generated_out, [  # novel: must not be
            (f"novel_{g}.png", encode(img, "PNG"), "prompt: something new")
            for g, (_, img) in enumerate(make_base_images(4, seed=seed + 1000))
        ])
    return SyntheticDataset(out, generated_out, shards.names, planted, {}, copies, novel, n_files)


def small_dataset(root: Path, generated: Path, n_bases: int = 24, seed: int = 3) -> SyntheticDataset:
    """The tests' dataset: two shards (a folder and a tar), bases, mild planted near-copies (some
    across shards) that any reasonable embedder must find, hostile files, generated copies and novel images."""
    from dedup_assets.synth.bases import make_base_images
    from dedup_assets.synth.transforms import TRANSFORMS

    rng = np.random.default_rng(seed)
    bases = make_base_images(n_bases, seed=seed)
    shards = _Shards(["s0", "s1"])
    planted: dict[str, str] = {}
    for b, (_, img) in enumerate(bases):
        shard = "s0" if b % 2 == 0 else "s1"
        shards.put(shard, f"b{b:03d}.jpg", encode(img), f"a picture number {b} of a calm scene",
                   {"url": f"https://example.org/{b}.jpg"})
    mild = ["resize", "jpeg", "flip"]
    for b in range(0, n_bases, 4):
        for c, op in enumerate(mild[: 1 + b % 3]):
            copy = TRANSFORMS[op](bases[b][1], rng)
            shard = "s1" if c % 2 == 0 else "s0"  # across shards too
            key = f"b{b:03d}c{c}"
            shards.put(shard, f"{key}.jpg", encode(copy, quality=85), f"a picture number {b} of a calm scene, copy")
            planted[f"{shard}/{key}"] = f"{'s0' if b % 2 == 0 else 's1'}/b{b:03d}"
    shards.put("s0", "empty.jpg", b"")
    shards.put("s0", "notimage.jpg", b"this is not an image at all")
    shards.put("s0", "truncated.jpg", encode(bases[1][1])[:600])
    hostile = {"s0/empty": "empty_file", "s0/notimage": "not_an_image", "s0/truncated": "truncated"}
    n_files = shards.write(root, tars={"s1"})

    copies = _write_generated(generated, [
        (f"copy{g}.png", encode(TRANSFORMS["resize"](bases[b][1], rng), quality=80), f"a prompt for copy {g}")
        for g, b in enumerate([0, 8])
    ])
    novel = _write_generated(generated, [
        (f"novel{g}.png", encode(img), None) for g, (_, img) in enumerate(make_base_images(2, seed=seed + 999))
    ])
    return SyntheticDataset(root, generated, shards.names, planted, hostile, copies, novel, n_files)
