"""GPU smoke test: GPU-vs-CPU parity and throughput of the GPU paths, measured in one run.

    python benchmarks/gpu_smoke.py                # < 5 min on one H100/H200-class GPU
    python benchmarks/gpu_smoke.py --quick        # < 1 min on a 2-core machine without a GPU
    python benchmarks/gpu_smoke.py --json out.json

Rows: pair search (kernels.block_pairs: fp16 GEMM + float32 re-scoring vs numpy float32; the same
pairs are required), spherical k-means (torch on the GPU vs faiss CPU from the same initial centroids:
the same partition is required; from their own starts: objective ratio), assignment of rows to five
clusterings in one pass (kmeans.assign_many), open_clip ViT-B-32 (random weights, offline) fp16 vs
fp32 cosines, and end-to-end ViT-B-32 fp16 embedding through embed_stream (target >= 2,000 images/s
on one H100-class GPU; reuses bench_embed_throughput). Ratios are GPU vs CPU measured in this run.
Without a GPU the GPU rows say "not measured". faiss, open_clip and Pillow are optional: a missing
one is reported and its rows are skipped (k-means then uses torch on the CPU as its CPU reference).
Exits 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dedup_assets.dedup import kernels, kmeans  # noqa: E402
from dedup_assets.dedup.synthetic import make_embeddings  # noqa: E402

HAVE = {m: importlib.util.find_spec(m) is not None for m in ("torch", "faiss", "open_clip", "PIL")}
EMBED_TARGET = 2000.0


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _sync(gpu: str | None) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def pairs_rows(gpu: str | None, quick: bool) -> list[dict]:
    d = 512
    n = 4096 if quick else 16384
    x, _ = make_embeddings(n, d=d, seed=0, n_topics=4, dup_fraction=0.3)
    tau = 0.9
    (ci, cj, cs), t_cpu = _timed(kernels.block_pairs, x, None, tau, "cpu", 4096)
    comps = kernels.block_comparisons(n, None, 4096)
    row = {"check": f"pairs {n}x{d} tau {tau}", "cpu_rate": comps / t_cpu, "unit": "comparisons/s", "hits": int(ci.size)}
    if gpu:
        kernels.block_pairs(x[:256], None, tau, gpu, 4096)  # warm-up (cuBLAS handles)
        (gi, gj, gs), _ = _timed(kernels.block_pairs, x, None, tau, gpu, 4096)
        same = set(zip(ci.tolist(), cj.tolist())) == set(zip(gi.tolist(), gj.tolist()))
        diff = float(np.max(np.abs(cs - gs))) if same and cs.size else 0.0
        big = np.vstack([x] * (4 if quick else 8))  # a bigger input for the rate
        _sync(gpu)
        _, t_gpu = _timed(kernels.block_pairs, big, None, tau, gpu, 4096)
        row.update(gpu_rate=kernels.block_comparisons(len(big), None, 4096) / t_gpu, parity=same, detail=f"max |sim diff| {diff:.2e}")
    return [row]


def kmeans_rows(gpu: str | None, quick: bool) -> list[dict]:
    if not HAVE["torch"] and not HAVE["faiss"]:
        return [{"check": "k-means", "skip": "neither torch nor faiss installed"}]
    d, k = (128, 64) if quick else (512, 1024)
    n, niter = 40 * k, (5 if quick else 20)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu_name = "faiss cpu" if HAVE["faiss"] else "torch cpu (faiss missing)"

    def cpu_fit(data, kk, it, init=None):
        if HAVE["faiss"]:
            return kmeans._faiss_kmeans(data, kk, it, seed=0, init=init)
        return kmeans._torch_kmeans(data, kk, it, seed=0, device="cpu", init=init)

    def obj(c):
        return float(np.mean(np.max(x @ kmeans._unit_rows(c).T, axis=1)))

    c_cpu, t_cpu = _timed(cpu_fit, x, k, niter)
    row = {"check": f"k-means {n}x{d} K={k} {niter} it ({cpu_name})", "cpu_rate": n * niter / t_cpu, "unit": "point-iterations/s"}
    out = [row]
    if gpu:
        kmeans._torch_kmeans(x[: 4 * k], k, 1, seed=0, device=gpu)  # warm-up
        c_gpu, t_gpu = _timed(kmeans._torch_kmeans, x, k, niter, 0, gpu)
        ratio = obj(c_gpu) / obj(c_cpu)
        row.update(gpu_rate=n * niter / t_gpu, parity=abs(ratio - 1) < 0.02, detail=f"objective gpu/cpu {ratio:.4f}")
        # Same start, well-separated data: the same partition.
        centers = np.linalg.qr(rng.standard_normal((d, 16)))[0].T.astype(np.float32)
        truth = np.repeat(np.arange(16), 200)
        y = centers[truth] + 0.05 * rng.standard_normal((len(truth), d)).astype(np.float32)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        init = y[np.arange(16) * 200]
        a = kmeans.assign(y, kmeans._unit_rows(cpu_fit(y, 16, 10, init.copy())), soft=False, device="cpu" if HAVE["faiss"] else gpu)[0]
        b = kmeans.assign(y, kmeans._unit_rows(kmeans._torch_kmeans(y, 16, 10, 0, gpu, init=init.copy())), soft=False, device=gpu)[0]
        out.append({"check": "k-means same start, separated blobs", "parity": bool(np.array_equal(a, b)), "detail": "identical labels"})
    return out


def assign_rows(gpu: str | None, quick: bool) -> list[dict]:
    d, k = (128, 64) if quick else (512, 1024)
    n = 20000 if quick else 200000
    x, _ = make_embeddings(n, d=d, seed=1)
    rng = np.random.default_rng(2)
    sets = [kmeans._unit_rows(x[rng.choice(n, k, replace=False)]) for _ in range(5)]
    row = {"check": f"assign {n}x{d} to 5 x K={k} (top-2)", "unit": "rows/s"}
    if HAVE["faiss"]:
        cpu, t_cpu = _timed(kmeans.assign_many, x, sets, True, "cpu")
        row["cpu_rate"] = n / t_cpu
    else:
        cpu = None
        row["cpu_note"] = "faiss missing"
    if gpu:
        kmeans.assign_many(x[:1000], sets, True, gpu)
        got, t_gpu = _timed(kmeans.assign_many, x, sets, True, gpu)
        row["gpu_rate"] = n / t_gpu
        if cpu is not None:
            agree = min(float(np.mean(g[0] == c[0])) for g, c in zip(got, cpu))
            row.update(parity=agree > 0.9999, detail=f"nearest-label agreement {agree:.6f}")
    return [row]


def clip_rows(gpu: str | None, quick: bool) -> list[dict]:
    missing = [m for m in ("open_clip", "PIL") if not HAVE[m]]
    if missing:
        return [{"check": "open_clip ViT-B-32", "skip": f"{' and '.join(missing)} not installed"}]
    from PIL import Image

    import bench_embed_throughput as bet
    from dedup_assets.embed.openclip import OpenClipConfig, OpenClipEmbedder

    rows: list[dict] = []
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(32)]
    if gpu:
        e32 = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cuda", precision="fp32"))
        e16 = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cuda", precision="fp16"))
        prep = [e32.prepare(im) for im in imgs]
        v32, v16 = e32.embed_prepared(prep), e16.embed_prepared(prep)
        cos = np.sum(v32 * v16, axis=1)
        rows.append({"check": "open_clip ViT-B-32 fp16 vs fp32 cosine", "parity": float(cos.min()) > 0.99,
                     "detail": f"min {cos.min():.5f} mean {cos.mean():.5f}"})
    else:
        rows.append({"check": "open_clip ViT-B-32 fp16 vs fp32 cosine", "detail": "fp16 needs CUDA"})
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        folder = Path(tmp)
        bet.write_jpegs(folder, 64 if quick else 512)
        files = sorted(folder.glob("*.jpg"))
        cpu = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cpu", precision="fp32", batch_size=16))
        cpu.load()
        r_cpu = bet.measure(cpu, files, 16 if quick else 64, 0, 16)
        row = {"check": "embed ViT-B-32 end to end (cpu fp32 / gpu fp16)", "cpu_rate": r_cpu["images_per_s"], "unit": "images/s"}
        if gpu:
            g = OpenClipEmbedder(OpenClipConfig(model="ViT-B-32", allow_random=True, device="cuda", precision="fp16", batch_size=256))
            g.load()
            g.embed_prepared([g.prepare(Image.open(files[0]).convert("RGB"))] * 8)
            workers = max(2, min(16, (os.cpu_count() or 4) - 2))
            r = bet.measure(g, files, 5000 if quick else 20000, workers, 256)
            best = max(r["images_per_s"], r["steady_images_per_s"] or 0.0)
            row.update(gpu_rate=r["images_per_s"], parity=None,
                       detail=f"steady {r['steady_images_per_s'] or 0:.0f}/s, {workers} workers; target {EMBED_TARGET:.0f}: {'met' if best >= EMBED_TARGET else 'NOT met'}")
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute on 2 CPU cores)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N (the GPU rows); cpu skips them")
    a = ap.parse_args()
    gpu = None
    if HAVE["torch"] and a.device != "cpu":
        resolved = kernels.resolve_device(a.device)
        gpu = resolved if resolved != "cpu" else None
    print(kernels.describe_backend(gpu or "cpu"))
    print("missing: " + (", ".join(m for m, ok in HAVE.items() if not ok) or "nothing"))
    rows: list[dict] = []
    for section in (pairs_rows, kmeans_rows, assign_rows, clip_rows):
        t = time.perf_counter()
        try:
            rows += section(gpu, a.quick)
        except Exception as exc:  # one broken section must not hide the others' figures
            rows.append({"check": section.__name__, "error": f"{type(exc).__name__}: {exc}", "parity": False})
        print(f"  {section.__name__}: {time.perf_counter() - t:.1f} s", flush=True)
    head = f"{'check':<52}{'CPU':>14}{'GPU':>14}{'GPU/CPU':>9}  {'unit':<20}{'parity':<8}detail"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "gpu_rate" not in r and gpu is None and "skip" not in r and "error" not in r:
            r.setdefault("gpu_note", "not measured (no GPU)")
        cpu = f"{r['cpu_rate']:.3g}" if "cpu_rate" in r else r.get("cpu_note", "-")
        g = f"{r['gpu_rate']:.3g}" if "gpu_rate" in r else ("not measured" if gpu is None else "-")
        ratio = f"{r['gpu_rate'] / r['cpu_rate']:.1f}x" if "gpu_rate" in r and "cpu_rate" in r else "-"
        par = {True: "ok", False: "FAIL", None: "-"}[r.get("parity")]
        detail = r.get("skip") or r.get("error") or r.get("detail", "")
        print(f"{r['check']:<52}{cpu:>14}{g:>14}{ratio:>9}  {r.get('unit', ''):<20}{par:<8}{detail}")
        if "gpu_rate" in r and "cpu_rate" in r:
            r["ratio_gpu_vs_cpu"] = r["gpu_rate"] / r["cpu_rate"]
    if a.json:
        Path(a.json).write_text(json.dumps({"backend": kernels.describe_backend(gpu or "cpu"), "gpu": gpu,
                                            "missing": [m for m, ok in HAVE.items() if not ok], "rows": rows}, indent=2))
    return 1 if any(r.get("parity") is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
