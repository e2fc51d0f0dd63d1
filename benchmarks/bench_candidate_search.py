"""Candidate search (k-means clusterings + exact search inside clusters) against brute force.

Run:
    .venv/bin/python benchmarks/bench_candidate_search.py --quick            # N = 20,000, ~20 s
    nice -n 10 .venv/bin/python benchmarks/bench_candidate_search.py --n 100000 1000000 --json out.json

What it measures, for each N (synthetic CLIP-like embeddings with planted near-duplicates, d=512):
  * the brute-force baseline: every pair's cosine, blocked matmul; above --brute-max rows it runs
    on a random --brute-max-row subset and its time is extrapolated by (N / subset)², which the
    output says;
  * the candidate search for 1..C clusterings (C = 5 by default), hard and soft assignment:
    recall overall, on tight pairs (cos ≥ 0.95) and on loose pairs (τ ≤ cos < 0.95), the
    cumulative time (k-means fit + assignment + pair search of clusterings 0..c-1) and its ratio
    to the brute-force time, and the dot products computed as a fraction of all N(N-1)/2 pairs;
  * the peak resident memory of the process (resource.getrusage).
Ground truth: the brute-force pairs when brute force ran on all N rows; otherwise every pair
inside a planted group with cosine ≥ τ (exact; at the N where both are known, every true pair
lies inside a planted group), checked by the exact neighbours of --recall-sample random images
(recall with a Wilson 95% interval, and the share of those true pairs that are planted).
--seed-recipe adds the plain DALL·E 2 recipe (K = 1024, 64·K training points, 20 iterations)
as a row for comparison. Timings depend on the machine's load; say so when reporting them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from dedup_assets.dedup.kmeans import ClusteringConfig, choose_k, default_subset_size, fit_clusterings
from dedup_assets.dedup.pairs import Pairs, brute_force_pairs, pairs_within_clusters, union_pairs
from dedup_assets.dedup.recall import true_pairs_of, wilson_interval
from dedup_assets.dedup.synthetic import make_embeddings

TIGHT = 0.95


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


@dataclass
class Truth:
    keys: np.ndarray  # sorted int64 keys i * n + j
    sim: np.ndarray
    source: str


def planted_truth(x: np.ndarray, planted: np.ndarray, tau: float) -> Truth:
    """All pairs with cosine ≥ tau inside each planted group (exact, cheap: groups are small)."""
    n = x.shape[0]
    rows = np.flatnonzero(planted >= 0)
    rows = rows[np.argsort(planted[rows], kind="stable")]
    g = planted[rows]
    cut = np.flatnonzero(np.diff(g)) + 1
    keys, sims = [], []
    for m in np.split(rows, cut):
        if m.size < 2:
            continue
        m = np.sort(m)
        s = x[m] @ x[m].T
        a, b = np.nonzero(np.triu(s >= np.float32(tau), 1))
        keys.append(m[a] * n + m[b])
        sims.append(s[a, b])
    k = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    s = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    order = np.argsort(k)
    return Truth(k[order], s[order], "planted pairs (exact within planted groups)")


def contains(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(query.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.size - 1)
    return sorted_keys[pos] == query


def recall_parts(truth: Truth, cand_keys: np.ndarray, tau: float) -> tuple[float, float, float]:
    hit = contains(cand_keys, truth.keys)
    tight = truth.sim >= TIGHT
    loose = (truth.sim >= tau) & ~tight

    def frac(mask: np.ndarray) -> float:
        return float(hit[mask].mean()) if mask.any() else float("nan")

    return frac(np.ones_like(hit)), frac(tight), frac(loose)


def run_mode(
    x: np.ndarray,
    cfg: ClusteringConfig,
    tau: float,
    block_size: int,
    device: str,
    truth: Truth,
    brute_seconds: float,
    label: str,
) -> tuple[list[dict], Pairs]:
    n = x.shape[0]
    all_pairs = n * (n - 1) / 2
    t0 = time.perf_counter()
    fitted = fit_clusterings(x, cfg)
    fit_total = time.perf_counter() - t0
    rows, per = [], []
    elapsed = fit_total - sum(c.fit_seconds + c.assign_seconds for c in fitted)  # faiss import etc.
    for c in fitted:
        t1 = time.perf_counter()
        per.append(
            pairs_within_clusters(
                x, c.labels, c.labels2, threshold=tau, block_size=block_size, device=device, clustering_index=c.index
            )
        )
        pair_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        u = union_pairs(per)
        cand_keys = np.sort(u.i * n + u.j)
        elapsed += c.fit_seconds + c.assign_seconds + pair_seconds + (time.perf_counter() - t2)
        overall, tight, loose = recall_parts(truth, cand_keys, tau)
        rows.append(
            {
                "mode": label,
                "clusterings": c.index + 1,
                "k": c.k,
                "subset_size": c.subset_size,
                "niter": cfg.niter,
                "recall": overall,
                "recall_tight": tight,
                "recall_loose": loose,
                "seconds": elapsed,
                "ratio_to_brute": elapsed / brute_seconds,
                "fit_seconds": c.fit_seconds,
                "assign_seconds": c.assign_seconds,
                "pair_seconds": pair_seconds,
                "comparison_fraction": u.comparisons / all_pairs if all_pairs else 0.0,
                "candidate_pairs": len(u),
            }
        )
    return rows, union_pairs(per)


def bench_n(n: int, args: argparse.Namespace) -> dict:
    tau = args.threshold
    t0 = time.perf_counter()
    x, planted = make_embeddings(n, d=args.d, seed=args.seed)
    gen_seconds = time.perf_counter() - t0
    print(f"\n=== N = {n:,}  d = {args.d}  τ = {tau}  (generated in {gen_seconds:.1f}s)", flush=True)

    nb = min(n, args.brute_max)
    t0 = time.perf_counter()
    # Rows come in random order, so the first nb rows are a random subset.
    exact = brute_force_pairs(x[:nb], tau, block_size=args.block_size, device=args.device)
    brute_measured = time.perf_counter() - t0
    brute_seconds = brute_measured * (n / nb) ** 2
    if nb == n:
        # Pairs come sorted by (i, j), so their keys are already sorted.
        truth = Truth(exact.i * n + exact.j, exact.sim, "brute force (exact)")
        brute_note = f"brute force on all {n:,} rows: {brute_measured:.1f}s, {len(exact):,} true pairs"
        planted_share = float(contains(planted_truth(x, planted, tau).keys, truth.keys).mean()) if len(exact) else 1.0
        brute_note += f" ({planted_share:.4f} of them inside planted groups)"
    else:
        truth = planted_truth(x, planted, tau)
        brute_note = (
            f"brute force on {nb:,} of {n:,} rows: {brute_measured:.1f}s → EXTRAPOLATED by (N/{nb:,})² "
            f"to {brute_seconds:.0f}s; truth = {len(truth.keys):,} planted pairs"
        )
    print(brute_note, flush=True)
    del exact

    k = choose_k(n)
    configs = []
    for soft in (False, True) if args.modes == "both" else ((args.modes == "soft"),):
        configs.append(
            ("soft" if soft else "hard", ClusteringConfig(
                n_clusterings=args.clusterings, soft=soft, niter=args.niter, seed=args.seed, device=args.device
            ))
        )
    if args.seed_recipe:
        configs.append(
            ("seed-recipe", ClusteringConfig(
                n_clusterings=args.clusterings, k=min(1024, n), subset_size=min(n, 64 * 1024), niter=20,
                seed=args.seed, device=args.device,
            ))
        )
    rows: list[dict] = []
    finals: dict[str, Pairs] = {}
    for label, cfg in configs:
        mode_rows, final = run_mode(x, cfg, tau, args.block_size, args.device, truth, brute_seconds, label)
        rows.extend(mode_rows)
        finals[label] = final
        print(f"  {label}: done, {mode_rows[-1]['seconds']:.1f}s for {cfg.n_clusterings} clusterings", flush=True)

    sampled: dict[str, dict] = {}
    if nb < n and args.recall_sample > 0:
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed + 1)
        sample = rng.choice(n, size=min(args.recall_sample, n), replace=False)
        ti, tj, ts = true_pairs_of(x, sample, tau)
        skeys = ti * n + tj
        planted_share = float(contains(truth.keys, skeys).mean()) if skeys.size else 1.0
        for label, final in finals.items():
            found = int(contains(np.sort(final.i * n + final.j), skeys).sum())
            lo, hi = wilson_interval(found, int(skeys.size))
            sampled[label] = {
                "recall": found / skeys.size if skeys.size else 1.0,
                "ci_low": lo,
                "ci_high": hi,
                "true_pairs": int(skeys.size),
                "planted_share": planted_share,
            }
        sampled_seconds = time.perf_counter() - t0
        print(f"  sampled check: exact neighbours of {sample.size:,} images in {sampled_seconds:.1f}s", flush=True)

    print_table(n, k, rows, brute_seconds, nb < n)
    for label, s in sampled.items():
        print(
            f"  sampled check ({label}, all {args.clusterings} clusterings): recall {s['recall']:.4f} "
            f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}] over {s['true_pairs']:,} true pairs of "
            f"{args.recall_sample:,} random images; {s['planted_share']:.4f} of those pairs are planted"
        )
    rss = peak_rss_gb()
    print(f"  peak RSS so far: {rss:.2f} GB", flush=True)
    return {
        "n": n,
        "d": args.d,
        "threshold": tau,
        "k": k,
        "default_subset_size": default_subset_size(n, k),
        "generate_seconds": gen_seconds,
        "brute_rows": nb,
        "brute_measured_seconds": brute_measured,
        "brute_seconds": brute_seconds,
        "brute_extrapolated": nb < n,
        "truth": truth.source,
        "true_pairs": int(truth.keys.size),
        "rows": rows,
        "sampled_check": sampled,
        "peak_rss_gb": rss,
    }


def print_table(n: int, k: int, rows: list[dict], brute_seconds: float, extrapolated: bool) -> None:
    print(f"  baseline: brute force {brute_seconds:.1f}s{' (extrapolated)' if extrapolated else ''} = 1.00")
    head = (
        f"  {'mode':<12}{'C':>2} {'K':>5} {'subset':>7} {'recall':>7} {'tight':>7} {'loose':>7} "
        f"{'time s':>8} {'× brute':>8} {'cmp/all':>8}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in rows:
        print(
            f"  {r['mode']:<12}{r['clusterings']:>2} {r['k']:>5} {r['subset_size']:>7} {r['recall']:>7.4f} "
            f"{r['recall_tight']:>7.4f} {r['recall_loose']:>7.4f} {r['seconds']:>8.1f} {r['ratio_to_brute']:>8.3f} "
            f"{r['comparison_fraction']:>8.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000], help="dataset sizes (default 100000)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="N = 20,000 only")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--clusterings", type=int, default=5)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--modes", choices=["hard", "soft", "both"], default="both")
    p.add_argument("--seed-recipe", action="store_true", help="also time K=1024 on 64·K points, 20 iterations")
    p.add_argument("--brute-max", type=int, default=100_000, help="largest N brute-forced in full")
    p.add_argument("--recall-sample", type=int, default=2000, help="images for the sampled check above --brute-max")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the same figures as JSON")
    args = p.parse_args(argv)
    sizes = [20_000] if args.quick else args.n
    started = time.perf_counter()
    results = [bench_n(n, args) for n in sizes]
    total = time.perf_counter() - started
    print(f"\npeak RSS of the whole run: {peak_rss_gb():.2f} GB; wall time {total:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "peak_rss_gb": peak_rss_gb()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
