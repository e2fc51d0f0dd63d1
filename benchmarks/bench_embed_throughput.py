"""End-to-end embedding throughput: read bytes + decode + prepare + embed, through `embed_stream`.

    nice -n 10 .venv/bin/python benchmarks/bench_embed_throughput.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_embed_throughput.py --quick               # ~1 min
    .venv/bin/python benchmarks/bench_embed_throughput.py --folder DIR --json out.json

Writes N 256-px JPEGs into a temporary folder (or reads the *.jpg of --folder) and measures images/s
for each embedder configuration:

- the offline embedder with 0, 1 and 2 worker processes;
- open_clip with random weights on the CPU in fp32: a small model (ViT-S-32-alt) and ViT-B-32,
  each with workers 0 and 1 (fewer images: they run at ~5-40 images/s on a CPU);
- when torch sees a CUDA GPU: open_clip ViT-B-32 fp16 with batch 256 and 8+ workers (the file list
  is cycled to --gpu-images so the run lasts long enough to measure), and its workers=0 baseline.

Model loading happens before the clock starts; worker start-up (spawn, imports) is inside it, so the
"steady" column (images/s between the first progress report and the end) is also shown.
Ratios: "vs serial" against the same embedder with workers=0, measured in this run (the baseline of
every row group), and "vs offline" against the offline embedder with workers=0.
Targets (reported, not asserted): offline >= 300 images/s on a 2-core machine; open_clip ViT-B-32
fp16 >= 2,000 images/s on one H100.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dedup_assets.embed.base import Embedder
from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.embed.openclip import OpenClipConfig, OpenClipEmbedder
from dedup_assets.embed.pipeline import embed_stream

OFFLINE_TARGET = 300.0
GPU_TARGET = 2000.0


def write_jpegs(folder: Path, n: int, side: int = 256, seed: int = 0) -> None:
    """N distinct photo-like JPEGs (smooth colour fields + texture), side × side px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85 + i % 10)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def _items(files: list[Path], n: int) -> Iterator[tuple[str, bytes]]:
    """Reads each file when the pipeline asks for it (bytes reading is part of the measurement)."""
    for k, path in enumerate(itertools.islice(itertools.cycle(files), n)):
        yield f"{k:07d}", path.read_bytes()


def measure(embedder: Embedder, files: list[Path], n: int, workers: int, batch: int) -> dict:
    marks: list[tuple[int, float]] = []
    res = embed_stream(
        embedder,
        _items(files, n),
        batch_size=batch,
        workers=workers,
        decode_side=getattr(embedder, "decode_side", None),
        progress=lambda k, s: marks.append((k, s)),
        progress_every=batch,
    )
    if res.failures:
        raise RuntimeError(f"unexpected decode failures: {res.failures[:3]}")
    steady = None
    if len(marks) >= 3 and marks[-1][1] > marks[0][1]:
        steady = (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])
    return {"n": len(res.ids), "seconds": res.seconds, "images_per_s": res.images_per_s, "steady_images_per_s": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="images written and used for the offline embedder")
    ap.add_argument("--folder", default=None, help="use the *.jpg files of this folder instead of writing them")
    ap.add_argument("--clip-images", type=int, default=96, help="images per open_clip CPU run")
    ap.add_argument("--gpu-images", type=int, default=20000, help="images per GPU run (files are cycled)")
    ap.add_argument("--gpu-workers", type=int, default=max(8, min(16, (os.cpu_count() or 8) - 2)))
    ap.add_argument("--quick", action="store_true", help="fewer images, skip ViT-B-32 on the CPU")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.quick:
        a.n, a.clip_images, a.gpu_images = min(a.n, 400), min(a.clip_images, 48), min(a.gpu_images, 5000)

    import torch

    tmp = None
    if a.folder:
        folder = Path(a.folder)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_embed_")
        folder = Path(tmp.name)
        t = time.perf_counter()
        write_jpegs(folder, a.n)
        print(f"wrote {a.n} JPEGs of 256 px in {time.perf_counter() - t:.1f} s")
    files = sorted(folder.glob("*.jpg"))[: a.n]
    if not files:
        raise SystemExit(f"no *.jpg files in {folder}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    # (group, label, embedder factory, workers, batch, images); row 0 of a group is its serial baseline
    plan: list[tuple[str, str, object, int, int, int]] = []
    for w in (0, 1, 2):
        plan.append(("offline", f"offline, workers={w}", OfflineEmbedder, w, 64, len(files)))
    clip_models = ["ViT-S-32-alt"] if a.quick else ["ViT-S-32-alt", "ViT-B-32"]
    for model in clip_models:
        cfg = OpenClipConfig(model=model, allow_random=True, device="cpu", precision="fp32", batch_size=32)
        for w in (0, 1):
            plan.append((f"{model} cpu", f"open_clip {model} cpu fp32, workers={w}", cfg, w, 32, a.clip_images))
    if gpu:
        cfg = OpenClipConfig(model="ViT-B-32", allow_random=True, device="cuda", precision="fp16", batch_size=256)
        plan.append(("ViT-B-32 cuda", "open_clip ViT-B-32 cuda fp16, workers=0", cfg, 0, 256, min(a.gpu_images, 2048)))
        plan.append(
            ("ViT-B-32 cuda", f"open_clip ViT-B-32 cuda fp16, workers={a.gpu_workers}", cfg, a.gpu_workers, 256, a.gpu_images)
        )

    rows: list[dict] = []
    embedders: dict[object, Embedder] = {}
    for group, label, spec, workers, batch, n in plan:
        if spec not in embedders:
            emb = spec() if spec is OfflineEmbedder else OpenClipEmbedder(spec)  # type: ignore[operator,arg-type]
            if isinstance(emb, OpenClipEmbedder):
                emb.load()  # model load is not part of the throughput
                emb.embed_prepared([emb.prepare(Image.open(files[0]).convert("RGB"))] * min(batch, 8))  # warm-up
            embedders[spec] = emb
        r = measure(embedders[spec], files, n, workers, batch)
        rows.append({"group": group, "label": label, "workers": workers, "batch": batch, **r})
        print(f"  {label}: {r['images_per_s']:.1f} images/s", flush=True)

    offline_serial = rows[0]["images_per_s"]
    serial = {}
    for r in rows:
        serial.setdefault(r["group"], r["images_per_s"])
        r["ratio_vs_serial"] = r["images_per_s"] / serial[r["group"]]
        r["ratio_vs_offline_serial"] = r["images_per_s"] / offline_serial

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{len(files)} JPEGs of 256 px from {folder}; {os.cpu_count()} CPUs (load average {load:.1f} at the end); "
        f"GPU: {gpu or 'none'}; torch {torch.__version__}"
    )
    head = f"{'configuration':<46}{'images':>8}{'seconds':>9}{'images/s':>10}{'steady':>9}{'vs serial':>11}{'vs offline':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] else "-"
        print(
            f"{r['label']:<46}{r['n']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.1f}{steady:>9}"
            f"{r['ratio_vs_serial']:>10.2f}x{r['ratio_vs_offline_serial']:>11.3f}x"
        )
    best_offline = max(r["images_per_s"] for r in rows if r["group"] == "offline")
    gpu_rows = [r for r in rows if r["group"] == "ViT-B-32 cuda" and r["workers"] > 0]
    targets = {
        "offline_images_per_s": {"target": OFFLINE_TARGET, "best": best_offline, "met": best_offline >= OFFLINE_TARGET},
        "gpu_vit_b32_fp16_images_per_s": {
            "target": GPU_TARGET,
            "best": gpu_rows[0]["images_per_s"] if gpu_rows else None,
            "met": (gpu_rows[0]["images_per_s"] >= GPU_TARGET) if gpu_rows else None,
        },
    }
    print(
        f"\ntarget offline >= {OFFLINE_TARGET:.0f} images/s: best {best_offline:.1f} "
        f"({'met' if targets['offline_images_per_s']['met'] else 'NOT met'})"
    )
    if gpu_rows:
        g = gpu_rows[0]["images_per_s"]
        print(f"target ViT-B-32 fp16 >= {GPU_TARGET:.0f} images/s on the GPU: {g:.1f} ({'met' if g >= GPU_TARGET else 'NOT met'})")
    else:
        print(f"target ViT-B-32 fp16 >= {GPU_TARGET:.0f} images/s on one H100: not measured (no CUDA GPU here)")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "files": len(files),
                    "cpus": os.cpu_count(),
                    "load_average_end": load,
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "rows": rows,
                    "targets": targets,
                },
                indent=2,
            )
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
