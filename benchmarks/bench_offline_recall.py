"""Near-copy precision/recall of the offline embedder against global-hash baselines.

    .venv/bin/python benchmarks/bench_offline_recall.py [--bases 400] [--copies 4] [--quick] [--json FILE]

Builds a labelled set (bases of four kinds — photo-like, graphics, text, clocks — each with copies
under single web transformations and 2–3-op combinations), embeds it with the offline embedder and
with two baselines measured in the same run (a 32×32 grayscale thumbnail and a 64-bit pHash, both
compared by cosine of their centred vectors), and prints: pair precision/recall at the embedder's
calibrated threshold, the best recall at precision ≥ 0.95 for each method, recall per
transformation, and end-to-end images/s (JPEG decode + prepare + embed of 256-px JPEGs) with 1 and
2 worker processes. Target: recall ≥ 0.80 at precision ≥ 0.95; ≥ 300 images/s on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image
from scipy.fft import dctn  # noqa: F401  (scipy ships with scikit-learn, a dependency of the profanity model)

from dedup_assets.embed.base import embed_images, l2_normalize
from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.synth.copyset import best_recall_at_precision, make_copy_set, pair_precision_recall, per_transform_recall


def thumb32(images: list[Image.Image]) -> np.ndarray:
    v = np.stack([np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), np.float32).ravel() for im in images])
    return l2_normalize(v - v.mean(axis=1, keepdims=True))


def phash(images: list[Image.Image]) -> np.ndarray:
    out = []
    for im in images:
        a = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)
        d = dctn(a, norm="ortho")[:8, :8].ravel()[1:]
        out.append(np.where(d > np.median(d), 1.0, -1.0))
    return l2_normalize(np.stack(out))


def throughput(n: int, workers: int) -> float:
    from dedup_assets.synth.bases import make_base_images

    items = []
    for i, (_, img) in enumerate(make_base_images(min(n, 64), seed=5, size=(256, 256))):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        items.append((str(i), buf.getvalue()))
    items = [(f"{k}-{r}", d) for r in range(n // len(items) + 1) for k, d in items][:n]
    emb = OfflineEmbedder()
    t = time.perf_counter()
    res = embed_stream(emb, items, batch_size=64, workers=workers, decode_side=emb.decode_side)
    return len(res.ids) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", type=int, default=400)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--throughput-images", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.quick:
        a.bases, a.copies, a.throughput_images = 80, 3, 400
    cs = make_copy_set(a.bases, a.copies, seed=a.seed)
    emb = OfflineEmbedder()
    t0 = time.perf_counter()
    methods = {"offline": embed_images(emb, cs.images)}
    t_off = time.perf_counter() - t0
    methods["thumb32 (baseline)"] = thumb32(cs.images)
    methods["phash64 (baseline)"] = phash(cs.images)
    print(f"labelled set: {a.bases} bases, {len(cs.images)} images, seed {a.seed}; offline threshold {emb.duplicate_threshold}")
    rows = {}
    print(f"\n{'method':<22}{'best recall@P≥.95':>18}{'at τ':>8}{'P@calib':>9}{'R@calib':>9}{'ratio vs thumb32':>18}")
    base_best = best_recall_at_precision(methods["thumb32 (baseline)"], cs.origin)[0]
    for name, x in methods.items():
        best, tau = best_recall_at_precision(x, cs.origin)
        calib = emb.duplicate_threshold if name == "offline" else tau
        p, r = pair_precision_recall(x, cs.origin, calib)
        rows[name] = {"best_recall_at_p95": best, "tau_at_p95": tau, "precision": p, "recall": r,
                      "per_transform": per_transform_recall(x, cs, calib)}
        print(f"{name:<22}{best:>18.3f}{tau:>8.3f}{p:>9.3f}{r:>9.3f}{best / max(base_best, 1e-9):>18.2f}")
    names = sorted(rows["offline"]["per_transform"])
    print(f"\nrecall of (base, copy) pairs per transformation (offline at its threshold; baselines at their P≥.95 τ)")
    print(f"{'transformation':<16}" + "".join(f"{m[:18]:>20}" for m in rows))
    for t in names:
        print(f"{t:<16}" + "".join(f"{rows[m]['per_transform'].get(t, float('nan')):>20.2f}" for m in rows))
    thr = {w: throughput(a.throughput_images, w) for w in (0, 1, 2)}
    print(f"\nend-to-end images/s (256-px JPEG decode + prepare + embed): "
          + ", ".join(f"workers={w}: {v:.0f}" for w, v in thr.items())
          + f"  (ratio 2 workers / in-process: {thr[2] / thr[0]:.2f}); in-process embed of the set: {len(cs.images) / t_off:.0f}/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "methods": rows, "images_per_s": thr}, f, indent=2)


if __name__ == "__main__":
    main()
