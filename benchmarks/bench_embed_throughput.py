"""End-to-end embedding throughput (read bytes + decode + prepare + embed) per embedder.

    .venv/bin/python benchmarks/bench_embed_throughput.py [--n 2000] [--folder DIR] [--quick] [--json FILE]

Writes N 256-px JPEGs (or reads --folder), then times `embed_stream` for the offline embedder with
0/1/2 worker processes and for open_clip models with random weights on CPU (fp32; a tiny ViT and
ViT-B-32) and, when a CUDA GPU is visible, ViT-B-32 fp16 with batch 256 and 8 workers. The baseline
is the offline embedder in-process (workers=0) in the same run; ratios are against it.
Targets: offline ≥ 300 images/s on 2 cores; open_clip ViT-B-32 fp16 ≥ 2,000 images/s on one H100.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.embed.openclip import OpenClipConfig, OpenClipEmbedder
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.synth.bases import make_base_images


def write_jpegs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    bases = make_base_images(min(n, 64), seed=3, size=(256, 256))
    for i in range(n):
        buf = io.BytesIO()
        bases[i % len(bases)][1].save(buf, "JPEG", quality=85 + i % 10)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def run(embedder, files: list[Path], workers: int, batch: int) -> float:  # noqa: ANN001
    items = ((p.name, p.read_bytes()) for p in files)
    t = time.perf_counter()
    res = embed_stream(embedder, items, batch_size=batch, workers=workers, decode_side=getattr(embedder, "decode_side", None))
    return len(res.ids) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    n = 300 if a.quick else a.n
    tmp = None
    if a.folder:
        folder = Path(a.folder)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        write_jpegs(folder, n)
    files = sorted(folder.glob("*.jpg"))[:n]
    import torch

    results: dict[str, float] = {}
    off = OfflineEmbedder()
    for w in (0, 1, 2):
        results[f"offline, workers={w}"] = run(off, files, w, 64)
    import open_clip

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "bench-tiny-vit.json").write_text(json.dumps({
        "embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(cfg_dir / "bench-tiny-vit.json")
    small = files[: max(64, n // 10)]
    results["open_clip tiny ViT (random), cpu fp32, workers=0"] = run(
        OpenClipEmbedder(OpenClipConfig(model="bench-tiny-vit", allow_random=True, device="cpu")), small, 0, 64)
    results["open_clip ViT-B-32 (random), cpu fp32, workers=0"] = run(
        OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cpu")), small[:64], 0, 32)
    if torch.cuda.is_available():
        results["open_clip ViT-B-32 (random), cuda fp16, workers=8"] = run(
            OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cuda")), files, 8, 256)
    base = results["offline, workers=0"]
    print(f"{len(files)} JPEGs of 256 px; GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"{'embedder':<55}{'images/s':>10}{'ratio':>8}")
    for k, v in results.items():
        print(f"{k:<55}{v:>10.1f}{v / base:>8.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"n": len(files), "images_per_s": results}, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
