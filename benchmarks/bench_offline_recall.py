"""Near-copy precision/recall and speed of the offline embedder against global-hash baselines.

    .venv/bin/python benchmarks/bench_offline_recall.py [--bases 400] [--copies 4] [--seed 4]
        [--more-seeds 6,7] [--throughput-images 2000] [--quick] [--json FILE]

What it measures, all in one run:

- a labelled set (synth.copyset): `--bases` base images of four kinds (photo-like scenes, flat
  graphics/charts, text pages, analog clocks — near-but-different images by construction), each
  with `--copies` copies (single web transformations, and every third copy a 2–3-op combination);
  a pair of images is a true duplicate exactly when both derive from one base;
- three methods on it: the offline embedder, and two baselines implemented here — a 32×32
  grayscale thumbnail and a 64-bit pHash (8×8 low DCT coefficients of a 32×32 thumbnail vs their
  median), both compared by cosine;
- for each method: the best pair recall at pair precision ≥ 0.95 (and the cosine giving it), and
  precision/recall at the method's threshold (the offline embedder's calibrated
  `duplicate_threshold`, which was fitted on other seeds; the baselines' own best threshold on
  this set, which flatters them); ratios against the thumbnail baseline;
- recall of (base, copy) pairs per transformation, and per image kind; for the offline embedder
  also precision and recall over all pairs that involve a copy made by each transformation;
- the offline embedder's headline figures on more labelled sets (`--more-seeds`, default 6,7;
  the embedder's weights were fitted on seeds 1, 3, 5 and its threshold on seed 2), so that one
  lucky set does not carry the result;
- end-to-end images/s for 256-px JPEGs (decode + prepare + embed through the embedding pipeline)
  in-process and with 1 and 2 worker processes, against the thumbnail baseline's decode + hash.

Target: recall ≥ 0.80 at precision ≥ 0.95; ≥ 300 images/s with 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from dedup_assets.embed.base import embed_images, l2_normalize
from dedup_assets.embed.offline import OfflineEmbedder
from dedup_assets.embed.pipeline import embed_stream
from dedup_assets.synth.bases import make_base_images
from dedup_assets.synth.copyset import (
    FIT_SETS,
    CopySet,
    FitSetError,
    best_recall_at_precision,
    check_report_set,
    make_copy_set,
    pair_precision_recall,
    per_transform_precision_recall,
    per_transform_recall,
    verified_detector,
)
from dedup_assets.synth.heldout import make_heldout_set


def _gray32(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)


def thumb32(images: list[Image.Image]) -> np.ndarray:
    """Baseline: centred 32×32 grayscale thumbnail."""
    v = np.stack([_gray32(im).ravel() for im in images])
    return l2_normalize(v - v.mean(axis=1, keepdims=True))


_N = 32
_DCT = np.sqrt(2.0 / _N) * np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))
_DCT[0] /= np.sqrt(2.0)


def phash(images: list[Image.Image]) -> np.ndarray:
    """Baseline: 64-bit pHash as ±1 bits (cosine = 1 - 2 * Hamming / 64)."""
    out = []
    for im in images:
        d = (_DCT @ _gray32(im) @ _DCT.T)[:8, :8].ravel()
        out.append(np.where(d > np.median(d[1:]), 1.0, -1.0))
    return l2_normalize(np.stack(out))


def per_kind_recall(emb: np.ndarray, cs: CopySet, threshold: float) -> dict[str, float]:
    base_row = {int(o): i for i, (o, op) in enumerate(zip(cs.origin, cs.ops)) if not op}
    hits: dict[str, list[bool]] = defaultdict(list)
    for i, (o, op) in enumerate(zip(cs.origin, cs.ops)):
        if op:
            hits[cs.kinds[i]].append(float(emb[i] @ emb[base_row[int(o)]]) >= threshold)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def _jpeg_items(n: int) -> list[tuple[str, bytes]]:
    items = []
    for i, (_, img) in enumerate(make_base_images(min(n, 64), seed=5, size=(256, 256))):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        items.append((str(i), buf.getvalue()))
    return [(f"{k}-{r}", d) for r in range(n // len(items) + 1) for k, d in items][:n]


def throughput(n: int, workers: int) -> float:
    """Images/s of decode + prepare + embed through the pipeline (workers=0: in-process)."""
    items = _jpeg_items(n)
    emb = OfflineEmbedder()
    t = time.perf_counter()
    res = embed_stream(emb, items, batch_size=64, workers=workers, decode_side=emb.decode_side)
    return len(res.ids) / (time.perf_counter() - t)


def throughput_baseline(n: int) -> float:
    """Images/s of full JPEG decode + 32×32 thumbnail, in-process."""
    items = _jpeg_items(n)
    t = time.perf_counter()
    thumb32([Image.open(io.BytesIO(d)) for _, d in items])
    return len(items) / (time.perf_counter() - t)


def detector_figures(a: argparse.Namespace, emb: OfflineEmbedder, cs_a: CopySet, x_a: np.ndarray) -> list[dict]:
    """The whole detector (vectors ≥ τ − margin, then geometric verification) on generator A's
    report set and on generator B (synth.heldout: other bases, OpenCV edits; nothing fitted on it)."""
    from dedup_assets.dedup.verify import VerifyConfig, extract_features

    margins = [float(m) for m in a.margins.split(",") if m.strip()]
    # --bands "0.1:0.3:10,…": every pair ≥ τ − 0.1, plus each image's 10 most similar down to τ − 0.3
    bands = [tuple(float(v) if n < 2 else int(v) for n, v in enumerate(b.split(":"))) for b in a.bands.split(",") if b.strip()]
    sets = [("A", a.seed, cs_a, x_a)]
    for seed in [int(v) for v in a.heldout_seeds.split(",") if v.strip()]:
        cs_b = make_heldout_set(a.heldout_bases, a.copies, seed=seed)
        sets.append(("B", seed, cs_b, embed_images(emb, cs_b.images)))
    out = []
    tau = emb.duplicate_threshold
    print("\nthe whole detector: candidates = cosine ≥ τ − margin, each verified (dedup.verify); "
          "predicted duplicate = accepted, or undecided and ≥ τ")
    print("  generator A = synth.copyset (PIL; the embedder and the verifier were fitted on its seeds "
          f"{sorted({s for _, (g, ss) in FIT_SETS.items() if g == 'A' for s in ss})}); "
          "B = synth.heldout (package photographs and icons, OpenCV drawings and edits; fitted on nothing)")
    print(f"{'gen':<4}{'seed':>5}{'notion':>16}{'margin':>16}{'cand/img':>9}{'P':>7}{'R':>7}{'vectors best R@P≥.95':>22}"
          f"{'min edit R':>12}{'3-edit R':>9}{'ms/pair':>9}")
    for gen, seed, cs, x in sets:
        vec_best = best_recall_at_precision(x, cs.origin)[0]
        t0 = time.perf_counter()
        feats = [extract_features(im, VerifyConfig()) for im in cs.images]  # keypoints do not depend on the notion
        kp_rate = len(cs.images) / (time.perf_counter() - t0)
        runs = [(notion, m, None) for notion in ("copy", "near_duplicate") for m in margins]
        runs += [("copy", bm, (bw, bk)) for bm, bw, bk in bands]
        for notion, m, band in runs:
            r = verified_detector(cs, x, tau, m, notion=notion, features=feats, band=band)
            r.update(generator=gen, seed=seed, vectors_best_recall_at_p95=vec_best, keypoint_images_per_s=kp_rate)
            single = {k: v for k, v in r["per_edit"].items() if "edits" not in k}
            label = f"{m:.2f}" if band is None else f"{m:.2f}+top{band[1]}@{band[0]:.2f}"
            print(f"{gen:<4}{seed:>5}{notion:>16}{label:>16}{r['candidates_per_image']:>9.1f}{r['precision']:>7.3f}"
                  f"{r['recall']:>7.3f}{vec_best:>22.3f}{min(single.values()):>12.2f}"
                  f"{r['per_edit'].get('3 edits', float('nan')):>9.2f}{r['ms_per_pair']:>9.2f}")
            out.append(r)
    last = [r for r in out if r["generator"] == "B" and r["notion"] == "copy"]
    if last:
        best = max(last, key=lambda r: r["recall"] if r["precision"] >= 0.95 else -1)
        print(f"  generator B, copy, margin {best['margin']}: per edit " +
              ", ".join(f"{k} {v:.2f}" for k, v in best["per_edit"].items()))
        print(f"  keypoints: {best['keypoint_images_per_s']:.0f} images/s (384 px, ≤ 600 SIFT keypoints)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", type=int, default=400)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--seed", type=int, default=4, help="generator A seed; refused if anything was fitted on it (1, 2, 3, 5, 11)")
    ap.add_argument("--more-seeds", default="6,7", help="comma-separated; '' for none")
    ap.add_argument("--throughput-images", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="80 bases × 3 copies, 600 images for speed")
    ap.add_argument("--heldout-seeds", default="1,2", help="generator B (synth.heldout) seeds for the detector; '' for none")
    ap.add_argument("--heldout-bases", type=int, default=140)
    ap.add_argument("--margins", default="0,0.1,0.2,0.3", help="search thresholds τ − margin for the verified detector")
    ap.add_argument("--bands", default="0.1:0.3:5,0.1:0.3:10,0.1:0.3:20",
                    help="margin:band_margin:k — all pairs ≥ τ − margin plus each image's k most similar down to τ − band_margin")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.quick:
        a.bases, a.copies, a.throughput_images, a.more_seeds, a.heldout_bases = 80, 3, 600, "", 42
        a.heldout_seeds = a.heldout_seeds.split(",")[0]
    try:
        for seed in [a.seed] + [int(x) for x in a.more_seeds.split(",") if x.strip()]:
            check_report_set("A", seed)
    except FitSetError as e:
        raise SystemExit(f"refusing to report: {e}")
    cs = make_copy_set(a.bases, a.copies, seed=a.seed)
    emb = OfflineEmbedder()
    t0 = time.perf_counter()
    methods = {"offline": embed_images(emb, cs.images)}
    t_off = time.perf_counter() - t0
    methods["thumb32"] = thumb32(cs.images)
    methods["phash64"] = phash(cs.images)
    n_pos = int(sum(np.sum(cs.origin == o) * (np.sum(cs.origin == o) - 1) // 2 for o in np.unique(cs.origin)))
    print(f"labelled set: {a.bases} bases × {a.copies} copies = {len(cs.images)} images, seed {a.seed}, "
          f"{n_pos} duplicate pairs; {emb.model_id}, duplicate_threshold {emb.duplicate_threshold}")
    rows: dict[str, dict] = {}
    base_best = best_recall_at_precision(methods["thumb32"], cs.origin)[0]
    print(f"\n{'method':<10}{'best R@P≥.95':>14}{'at cos':>8}{'threshold':>11}{'P':>7}{'R':>7}{'R@P≥.95 vs thumb32':>21}")
    for name, x in methods.items():
        best, tau = best_recall_at_precision(x, cs.origin)
        thr = emb.duplicate_threshold if name == "offline" else tau
        p, r = pair_precision_recall(x, cs.origin, thr)
        rows[name] = {"best_recall_at_p95": best, "cos_at_p95": tau, "threshold": thr, "precision": p, "recall": r,
                      "per_transform": per_transform_recall(x, cs, thr), "per_kind": per_kind_recall(x, cs, thr)}
        print(f"{name:<10}{best:>14.3f}{tau:>8.3f}{thr:>11.3f}{p:>7.3f}{r:>7.3f}{best / max(base_best, 1e-9):>21.2f}")
    print("\nrecall of (base, copy) pairs per transformation at each method's threshold "
          "(offline: calibrated; baselines: their best on this set)")
    print(f"{'transformation':<16}" + "".join(f"{m:>10}" for m in rows))
    for t in sorted(rows["offline"]["per_transform"]):
        print(f"{t:<16}" + "".join(f"{rows[m]['per_transform'].get(t, float('nan')):>10.2f}" for m in rows))
    for k in sorted(rows["offline"]["per_kind"]):
        print(f"{'kind ' + k:<16}" + "".join(f"{rows[m]['per_kind'].get(k, float('nan')):>10.2f}" for m in rows))
    pr = per_transform_precision_recall(methods["offline"], cs, emb.duplicate_threshold)
    rows["offline"]["per_transform_pairs"] = {k: {"precision": p, "recall": r} for k, (p, r) in pr.items()}
    print(f"\noffline at τ={emb.duplicate_threshold}: precision / recall over all pairs that involve a copy made by each "
          "transformation (its base, its sibling copies, every other image)")
    print(f"{'transformation':<16}{'P':>8}{'R':>8}")
    for k, (p, r) in pr.items():
        print(f"{k:<16}{p:>8.3f}{r:>8.3f}")
    more = {}
    for seed in [int(x) for x in a.more_seeds.split(",") if x.strip()]:
        other = make_copy_set(a.bases, a.copies, seed=seed)
        x = embed_images(emb, other.images)
        best, tau = best_recall_at_precision(x, other.origin)
        p, r = pair_precision_recall(x, other.origin, emb.duplicate_threshold)
        tb = best_recall_at_precision(thumb32(other.images), other.origin)[0]
        more[seed] = {"best_recall_at_p95": best, "cos_at_p95": tau, "precision": p, "recall": r, "thumb32_best": tb}
    if more:
        print(f"\noffline on more labelled sets ({a.bases} bases × {a.copies} copies each)")
        print(f"{'seed':<6}{'best R@P≥.95':>14}{'at cos':>8}{'P at τ':>8}{'R at τ':>8}{'vs thumb32':>12}")
        for seed, m in more.items():
            print(f"{seed:<6}{m['best_recall_at_p95']:>14.3f}{m['cos_at_p95']:>8.3f}{m['precision']:>8.3f}{m['recall']:>8.3f}"
                  f"{m['best_recall_at_p95'] / max(m['thumb32_best'], 1e-9):>11.2f}×")
    detector = detector_figures(a, emb, cs, methods["offline"])
    n = a.throughput_images
    thr_s = {f"workers={w}": throughput(n, w) for w in (0, 1, 2)}
    thr_s["thumb32 baseline (in-process)"] = throughput_baseline(n)
    print(f"\nend-to-end images/s, {n} 256-px JPEGs (decode + prepare + embed):")
    for k, v in thr_s.items():
        print(f"  {k:<32}{v:>8.0f}{v / thr_s['thumb32 baseline (in-process)']:>8.2f}× baseline")
    print(f"  (in-process prepare+embed of the labelled set, no decode: {len(cs.images) / t_off:.0f}/s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "model_id": emb.model_id, "methods": rows, "more_seeds": more,
                       "detector": detector, "fit_sets": {k: list(v) for k, v in FIT_SETS.items()},
                       "images_per_s": thr_s}, f, indent=2)


if __name__ == "__main__":
    main()
