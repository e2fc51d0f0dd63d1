"""The REAL corpus assets at 1M–10M vectors: per-asset time and memory under a hard cap, recall of
all pairs ≥ τ, and the time against exact brute force and against faiss IVF at equal recall.

Run (from the repository root; one at a time on a shared machine):
    .venv/bin/python benchmarks/bench_corpus_scale.py --quick                 # 3,000 vectors, < 1 min
    nice -n 10 .venv/bin/python benchmarks/bench_corpus_scale.py --n 1000000 --json out.json
    .venv/bin/python benchmarks/bench_corpus_scale.py                         # N = 1M, 2M, 4M
    .venv/bin/python benchmarks/bench_corpus_scale.py --n 10000000

For each N:
  1. Data: `TopicCoreEmbeddings` (dedup_assets.dedup.synthetic) — most pairs ≥ τ are different
     images in dense per-topic low-rank cores, plus planted near-copies — written in the
     clip-retrieval layout: `img_emb/img_emb_{i}.npy` (float16 by default) + `metadata/metadata_{i}.parquet`
     (`key`, `caption`, `url`, and the labels `topic`, `core`, `planted_group`), plus a folder of
     generated vectors for the audit (near-copies of training rows and novel ones).
  2. The run, as a user runs it: `python -m dedup_assets.cli run --embeddings DIR --threshold T
     --generated-embeddings GEN` in a fresh warehouse and DAGSTER_HOME, in its own memory cgroup with
     a hard limit (`--cap-gb`, default 3): cgroup v2 (memory.max / memory.peak) or v1
     (memory.limit_in_bytes / memory.max_usage_in_bytes), whichever this machine has; without
     either the run is watched by sampling and killed above the cap, and the output says so.
     The kernel's peak counts page cache (which it reclaims under the cap); the anonymous memory of
     the cgroup and the summed RSS of the process tree are sampled every 0.2 s beside it.
     Per asset: wall time and rows from the run's Dagster event log; peak memory = the largest
     sample taken while that asset's steps ran.
  3. Truth: exact brute force (the project's blocked matmul) over all pairs when N ≤ --brute-max;
     above it, brute force on a random subset of --brute-max rows (its time scaled by (N/subset)²,
     "extrapolated") and the exact neighbours of --recall-sample random rows over all N rows
     ("sampled"): recall = found/true over the pairs incident to them (each pair's chance to be
     counted is the same, so this estimates the recall of all pairs), with a bootstrap 95% interval
     over the sampled rows (misses cluster, a binomial interval would be too narrow). The subset's
     exact all-pairs recall is printed too.
  4. faiss: `IndexIVFFlat` (inner product, nlist = 4·√N, trained on 40·nlist random rows), nprobe
     doubled until its recall on the same sampled rows reaches the run's recall, then the range
     search of all N rows at that nprobe; train + add + search, in this process, in this run.
     Above --faiss-max rows the database is added in shards of --faiss-max rows to one trained
     quantizer (the same lists, so the same results); the coarse quantization is counted once.
     Above --faiss-queries rows (100k) the range search runs for a random sample of that many rows
     and its time is scaled by N / sample ("extrapolated"; at nprobe ≈ 1,000 a full search of 1M
     rows takes most of an hour here).
Targets (printed pass/fail, not asserted): within the cap at every N, recall ≥ 0.99, corpus-stage
time ≤ 1/10 of brute force, no slower than faiss IVF at equal recall, time growing no faster than
N^1.2. Timings depend on the machine's load; say so when reporting them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dedup_assets.dedup.pairs import brute_force_pairs  # noqa: E402
from dedup_assets.dedup.synthetic import TopicCoreEmbeddings  # noqa: E402

GB = 1024**3
PER_PARTITION = {"image_index", "prefilter", "embeddings"}  # the import; everything else is the corpus stage


# ----------------------------------------------------------------------------------- the data
@dataclass
class Dataset:
    root: Path
    generated: Path
    n: int
    d: int
    files: list[Path]  # the img_emb npy files, in order
    planted: np.ndarray
    topic: np.ndarray
    core: np.ndarray
    gen_sources: np.ndarray  # training row each generated near-copy was made from (-1: novel)
    seconds: float

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of the given global rows (sorted or not), read from the npy files."""
        out = np.empty((rows.size, self.d), dtype=np.float32)
        starts = np.cumsum([0] + [np.load(f, mmap_mode="r").shape[0] for f in self.files])
        which = np.searchsorted(starts, rows, side="right") - 1
        for f in np.unique(which):
            sel = np.flatnonzero(which == f)
            out[sel] = np.load(self.files[f], mmap_mode="r")[rows[sel] - starts[f]]
        return out

    def blocks(self, block_rows: int = 65_536):
        """(first global row, float32 block) over all rows, in order."""
        s = 0
        for f in self.files:
            m = np.load(f, mmap_mode="r")
            for b in range(0, m.shape[0], block_rows):
                yield s + b, np.ascontiguousarray(m[b : b + block_rows], dtype=np.float32)
            s += m.shape[0]


def key_of(row: int) -> str:
    return f"{row:010d}"


_ROW = re.compile(r"(\d{10})$")


def row_of(image_id: str) -> int:
    """The global row of an image id built from our `key` column (whatever prefix the import adds)."""
    m = _ROW.search(image_id)
    if not m:
        raise ValueError(f"image id {image_id!r} does not end in the 10-digit key this benchmark wrote")
    return int(m.group(1))


_NOUNS = ("red bicycle", "small dog", "wooden table", "mountain lake", "city street", "old lighthouse", "green teapot")
_PLACES = ("river", "market", "garden", "station", "beach", "library", "bridge")


def _caption(row: int) -> str:
    """An ordinary English caption (the import's rows go through the caption filters)."""
    return f"a quiet photo of a {_NOUNS[row % 7]} near the {_PLACES[(row // 7) % 7]} in the morning light"


def write_dataset(root: Path, n: int, d: int, tau: float, seed: int, file_rows: int, dtype: str, n_generated: int) -> Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    gen = TopicCoreEmbeddings(n, d=d, seed=seed, tau=tau)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    planted = np.empty(n, np.int64)
    topic = np.empty(n, np.int32)
    core = np.empty(n, bool)
    files: list[Path] = []
    buf: list[np.ndarray] = []
    buffered = 0
    row = 0

    def flush(upto: int) -> None:
        nonlocal buf, buffered, row
        x = np.concatenate(buf) if len(buf) > 1 else buf[0]
        out, rest = x[:upto], x[upto:]
        i = len(files)
        path = root / "img_emb" / f"img_emb_{i}.npy"
        np.save(path, out.astype(dtype))
        keys = [key_of(r) for r in range(row, row + out.shape[0])]
        pq.write_table(
            pa.table({
                "key": keys,
                "caption": [_caption(r) for r in range(row, row + out.shape[0])],
                "url": [f"https://example.invalid/{k}.jpg" for k in keys],
                "topic": topic[row : row + out.shape[0]],
                "core": core[row : row + out.shape[0]],
                "planted_group": planted[row : row + out.shape[0]],
            }),
            root / "metadata" / f"metadata_{i}.parquet",
        )
        files.append(path)
        row += out.shape[0]
        buf = [rest] if rest.shape[0] else []
        buffered = rest.shape[0]

    s = 0
    for x, g, t, c in gen.chunks():
        planted[s : s + x.shape[0]], topic[s : s + x.shape[0]], core[s : s + x.shape[0]] = g, t, c
        s += x.shape[0]
        buf.append(x)
        buffered += x.shape[0]
        while buffered >= file_rows:
            flush(file_rows)
    if buffered:
        flush(buffered)

    # Generated vectors for the audit: half are near-copies (cosine 0.97) of random training rows.
    ds = Dataset(root, root.parent / (root.name + "_generated"), n, d, files, planted, topic, core, np.zeros(0, np.int64), 0.0)
    rng = np.random.default_rng([seed, 99])
    n_copy = min(n, n_generated // 2)
    src = np.sort(rng.choice(n, n_copy, replace=False)) if n_copy else np.zeros(0, np.int64)
    from dedup_assets.dedup.synthetic import perturb_to_cosine

    copies = perturb_to_cosine(ds.rows(src), np.full(n_copy, 0.97), rng) if n_copy else np.zeros((0, d), np.float32)
    novel = rng.standard_normal((n_generated - n_copy, d)).astype(np.float32)
    novel /= np.linalg.norm(novel, axis=1, keepdims=True)
    (ds.generated / "img_emb").mkdir(parents=True)
    (ds.generated / "metadata").mkdir()
    np.save(ds.generated / "img_emb" / "img_emb_0.npy", np.concatenate([copies, novel]).astype(dtype))
    gkeys = [f"copy_{key_of(int(r))}" for r in src] + [f"novel_{i:05d}" for i in range(n_generated - n_copy)]
    pq.write_table(
        pa.table({"key": gkeys, "caption": [f"prompt {k}" for k in gkeys]}),
        ds.generated / "metadata" / "metadata_0.parquet",
    )
    ds.gen_sources = np.concatenate([src, np.full(n_generated - n_copy, -1)])
    ds.seconds = time.perf_counter() - t0
    return ds


# ------------------------------------------------------------------------ the memory cap
def _own_cgroup(controller: str | None) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if (controller is None and hid == "0") or (controller and controller in ctrls.split(",")):
            return path
    return None


class MemoryCap:
    """A hard memory limit for one child process tree, and its peak.

    method: "cgroup v2", "cgroup v1" or "sampling" (no writable memory cgroup: the tree's summed
    RSS is sampled and the tree killed above the cap — a soft cap, said so in the output).
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap = cap_bytes
        self.dir: Path | None = None
        self.method = "sampling"
        name = f"bench-corpus-scale-{os.getpid()}-{int(time.time())}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if v2.exists() and "memory" in v2.read_text().split():
                parent = Path("/sys/fs/cgroup") / (_own_cgroup(None) or "/").lstrip("/")
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                d = parent / name
                d.mkdir()
                (d / "memory.max").write_text(str(cap_bytes))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                self.dir, self.method = d, "cgroup v2"
            elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() or _own_cgroup("memory"):
                d = Path("/sys/fs/cgroup/memory") / (_own_cgroup("memory") or "/").lstrip("/") / name
                d.mkdir()
                (d / "memory.limit_in_bytes").write_text(str(cap_bytes))
                if (d / "memory.memsw.limit_in_bytes").exists():  # no swapping around the cap
                    (d / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
                self.dir, self.method = d, "cgroup v1"
        except OSError as e:
            self.note = f"no writable memory cgroup ({e}); falling back to RSS sampling with a soft cap"
            self.dir = None
        else:
            self.note = "" if self.dir else "no memory cgroup on this machine; RSS sampling with a soft cap"

    def join(self) -> None:
        """Called in the child before exec: move it (and so all it starts) into the cgroup."""
        if self.dir is not None:
            (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self, root_pid: int) -> list[int]:
        if self.dir is not None:
            return [int(p) for p in (self.dir / "cgroup.procs").read_text().split()]
        return _tree(root_pid)

    def usage(self) -> tuple[int, int]:
        """(kernel usage incl. page cache, anonymous memory) of the cgroup; (0, 0) when sampling."""
        if self.dir is None:
            return 0, 0
        stat = dict(
            (k, int(v)) for k, v in (ln.split() for ln in (self.dir / "memory.stat").read_text().splitlines())
        )
        if self.method == "cgroup v2":
            return int((self.dir / "memory.current").read_text()), stat.get("anon", 0) + stat.get("shmem", 0)
        return int((self.dir / "memory.usage_in_bytes").read_text()), stat.get("total_rss", stat.get("rss", 0)) + stat.get(
            "total_shmem", stat.get("shmem", 0)
        )

    def kernel_peak(self) -> int | None:
        if self.dir is None:
            return None
        f = "memory.peak" if self.method == "cgroup v2" else "memory.max_usage_in_bytes"
        return int((self.dir / f).read_text()) if (self.dir / f).exists() else None

    def oom_killed(self) -> int:
        if self.dir is None:
            return 0
        f = self.dir / ("memory.events" if self.method == "cgroup v2" else "memory.oom_control")
        for ln in f.read_text().splitlines() if f.exists() else []:
            k, _, v = ln.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def close(self) -> None:
        if self.dir is not None:
            for _ in range(50):
                try:
                    self.dir.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [root]
    while todo:
        q = todo.pop()
        out.append(q)
        todo.extend(children.get(q, []))
    return out


def _rss(pids: list[int]) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class CappedRun:
    rc: int
    wall_s: float
    method: str
    note: str
    cap_bytes: int
    kernel_peak: int | None
    oom_kills: int
    killed_by_sampler: bool
    samples: list[tuple[float, int, int, int]]  # (unix time, kernel usage, anon, summed RSS)
    output_tail: str

    def peak(self, col: int, t0: float = 0.0, t1: float = float("inf")) -> int:
        vals = [s[col] for s in self.samples if t0 <= s[0] <= t1]
        return max(vals) if vals else 0


def run_capped(cmd: list[str], cap_gb: float, env: dict[str, str], timeout_s: float, log: Path) -> CappedRun:
    cap = MemoryCap(int(cap_gb * GB))
    samples: list[tuple[float, int, int, int]] = []
    killed = False
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=cap.join, cwd=REPO, start_new_session=True
        )
        stop = threading.Event()

        def sample() -> None:
            nonlocal killed
            while not stop.is_set():
                try:
                    usage, anon = cap.usage()
                    rss = _rss(cap.pids(proc.pid))
                except (OSError, ValueError):
                    usage = anon = rss = 0
                samples.append((time.time(), usage, anon, rss))
                if cap.dir is None and rss > cap.cap and not killed:
                    killed = True
                    os.killpg(proc.pid, signal.SIGKILL)
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    run = CappedRun(
        rc, wall, cap.method, cap.note, cap.cap, cap.kernel_peak(), cap.oom_killed(), killed, samples,
        log.read_bytes()[-4000:].decode("utf-8", "replace"),
    )
    cap.close()
    return run


# ------------------------------------------------------------------- the run's event log
@dataclass
class AssetFigures:
    asset: str
    steps: int = 0
    seconds: float = 0.0
    rows: int = 0
    windows: list[tuple[float, float]] = field(default_factory=list)
    check: bool = True  # a step that materialized nothing: an asset check


def asset_figures(dagster_home: Path) -> list[AssetFigures]:
    """Per asset (in order of first start): its steps' summed wall time, time windows and rows."""
    from dagster import DagsterEventType, DagsterInstance

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = DagsterInstance.get()
    figs: dict[str, AssetFigures] = {}
    try:
        for run in reversed(instance.get_runs()):
            starts: dict[str, float] = {}
            ends: dict[str, float] = {}
            assets_of: dict[str, set[str]] = {}
            rows_of: dict[str, int] = {}
            for rec in instance.all_logs(run.run_id):
                ev = rec.dagster_event
                if ev is None or ev.step_key is None:
                    continue
                if ev.event_type == DagsterEventType.STEP_START:
                    starts[ev.step_key] = rec.timestamp
                elif ev.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                    ends[ev.step_key] = rec.timestamp
                elif ev.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                    mat = ev.step_materialization_data.materialization
                    name = mat.asset_key.to_user_string()
                    assets_of.setdefault(ev.step_key, set()).add(name)
                    rc = mat.metadata.get("dagster/row_count")
                    rows_of[name] = rows_of.get(name, 0) + (int(rc.value) if rc is not None else 0)
            for step, t_start in sorted(starts.items(), key=lambda kv: kv[1]):
                name = ", ".join(sorted(assets_of.get(step, {step})))
                f = figs.setdefault(name, AssetFigures(name))
                f.check = f.check and step not in assets_of and "." not in step  # graph-asset ops are not checks
                t_end = ends.get(step, t_start)
                f.steps += 1
                f.seconds += t_end - t_start
                f.windows.append((t_start, t_end))
            for name, r in rows_of.items():
                key = next((k for k in figs if name in k.split(", ")), None)
                if key:
                    figs[key].rows += r
    finally:
        instance.dispose()
    return list(figs.values())


# ---------------------------------------------------------------------------- ground truth
@dataclass
class SampledTruth:
    rows: np.ndarray  # sampled global rows
    partners: list[np.ndarray]  # per sampled row: the rows j != row with cos ≥ τ (sorted)
    seconds: float


def sampled_truth(ds: Dataset, sample: np.ndarray, tau: float) -> SampledTruth:
    t0 = time.perf_counter()
    q = ds.rows(sample)
    hits_r, hits_c = [], []
    for s, block in ds.blocks(16_384):
        for b in range(0, q.shape[0], 4096):  # panels of at most 4,096 × 16,384
            r, c = np.nonzero(q[b : b + 4096] @ block.T >= np.float32(tau))
            hits_r.append(r + b)
            hits_c.append(c + s)
    r = np.concatenate(hits_r)
    c = np.concatenate(hits_c)
    keep = c != sample[r]
    return SampledTruth(sample, _partners(r[keep], c[keep], sample.size), time.perf_counter() - t0)


def _partners(r: np.ndarray, c: np.ndarray, m: int) -> list[np.ndarray]:
    """Per row 0..m-1: the sorted c of its (r, c) entries."""
    order = np.lexsort((c, r))
    r, c = r[order], c[order]
    cuts = np.searchsorted(r, np.arange(m + 1))
    return [c[cuts[i] : cuts[i + 1]] for i in range(m)]


def truth_from_pairs(i: np.ndarray, j: np.ndarray, m: int) -> SampledTruth:
    """Every row 0..m-1 with its partners, from exact all-pairs (i < j) of those rows."""
    return SampledTruth(np.arange(m), _partners(np.concatenate([i, j]), np.concatenate([j, i]), m), 0.0)


def _bootstrap(found: np.ndarray, true: np.ndarray, seed: int, reps: int = 2000) -> tuple[float, float]:
    if true.sum() == 0:
        return 1.0, 1.0
    rng = np.random.default_rng(seed)
    per = max(1, 4_000_000 // true.size)  # resamples at a time: bounded memory
    ratios = []
    for s in range(0, reps, per):
        idx = rng.integers(0, true.size, size=(min(per, reps - s), true.size))
        ratios.append(found[idx].sum(axis=1) / np.maximum(1, true[idx].sum(axis=1)))
    ratios = np.concatenate(ratios)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def recall_of(truth: SampledTruth, partners_found: list[np.ndarray], seed: int) -> dict:
    found = np.array([np.isin(t, f).sum() for t, f in zip(truth.partners, partners_found)], dtype=np.int64)
    true = np.array([t.size for t in truth.partners], dtype=np.int64)
    lo, hi = _bootstrap(found, true, seed)
    return {"recall": float(found.sum() / max(1, true.sum())), "ci_low": lo, "ci_high": hi,
            "true_pairs": int(true.sum()), "found": int(found.sum())}


def run_partners(warehouse: Path, rows: np.ndarray) -> list[np.ndarray]:
    """Per row: the rows the run paired it with (candidate_pairs, either side)."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        wanted = pa.table({"row": rows.astype(np.int64)})
        con.register("wanted", wanted)
        df = con.sql(
            "SELECT image_a, image_b FROM candidate_pairs "
            "WHERE TRY_CAST(regexp_extract(image_a, '(\\d{10})$', 1) AS BIGINT) IN (SELECT row FROM wanted) "
            "OR TRY_CAST(regexp_extract(image_b, '(\\d{10})$', 1) AS BIGINT) IN (SELECT row FROM wanted)"
        ).fetchall()
    finally:
        con.close()
    pos = {int(r): i for i, r in enumerate(rows)}
    acc: list[list[int]] = [[] for _ in rows]
    for a, b in df:
        ra, rb = row_of(a), row_of(b)
        if ra in pos:
            acc[pos[ra]].append(rb)
        if rb in pos:
            acc[pos[rb]].append(ra)
    return [np.unique(np.asarray(v, dtype=np.int64)) for v in acc]


# ------------------------------------------------------------------------------- faiss IVF
def faiss_ivf(
    ds: Dataset, truth: SampledTruth, tau: float, target: float, faiss_max: int, seed: int, query_max: int = 100_000
) -> dict:
    import faiss

    n, d = ds.n, ds.d
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 40))
    rng = np.random.default_rng([seed, 5])
    t0 = time.perf_counter()
    train = ds.rows(np.sort(rng.choice(n, min(n, 40 * nlist), replace=False)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    del train
    train_s = time.perf_counter() - t0
    shards = list(range(0, n, faiss_max))
    q = ds.rows(truth.rows)
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if p < nlist] + [nlist]
    found_by_probe: dict[int, list[list[np.ndarray]]] = {p: [] for p in probes}
    add_s = 0.0
    search_s = 0.0
    chosen: int | None = None
    calib: list[dict] = []
    results = 0

    def add_shard(lo: int) -> float:
        index.reset()
        t = time.perf_counter()
        for s, block in ds.blocks():
            if lo <= s < lo + faiss_max:
                index.add(block)
        return time.perf_counter() - t

    # Pass 1 (per shard): add, then range-search the sampled rows at every nprobe for the calibration.
    for lo in shards:
        add_s += add_shard(lo)
        for p in probes:
            index.nprobe = p
            lims, _, ids = index.range_search(q, tau)
            found_by_probe[p].append([ids[lims[i] : lims[i + 1]] + lo for i in range(q.shape[0])])
    for p in probes:
        merged = [np.unique(np.concatenate([part[i] for part in found_by_probe[p]])) for i in range(q.shape[0])]
        merged = [m[m != r] for m, r in zip(merged, truth.rows)]
        rec = recall_of(truth, merged, seed)
        calib.append({"nprobe": p, **rec})
        if rec["recall"] >= target:
            chosen = p
            break
    if chosen is None:
        chosen = probes[-1]
    # Pass 2: the range search of every row at the chosen nprobe (the shard in memory is searched first);
    # above `query_max` rows, of a random sample of query_max rows, its time scaled by N / query_max
    # ("extrapolated": a query's cost does not depend on which row it is, only on nprobe and the lists).
    index.nprobe = chosen
    coarse_s = 0.0
    sampled = n > query_max
    if sampled:
        qrows = np.sort(rng.choice(n, query_max, replace=False))

        def query_blocks():
            for s in range(0, qrows.size, 65_536):
                yield s, ds.rows(qrows[s:s + 65_536])
    else:
        def query_blocks():
            yield from ds.blocks()
    scale = n / query_max if sampled else 1.0
    for k, lo in enumerate(reversed(shards)):
        if k:
            add_s += add_shard(lo)
        t = time.perf_counter()
        for _, block in query_blocks():
            lims, _, _ = index.range_search(block, tau)
            results += int(lims[-1])
        search_s += (time.perf_counter() - t) * scale
    if len(shards) > 1:  # the coarse quantization of every query ran once per shard: count it once
        t = time.perf_counter()
        for _, block in query_blocks():
            quantizer.search(block, chosen)
        coarse_s = (time.perf_counter() - t) * scale
        search_s -= (len(shards) - 1) * coarse_s
    index.reset()
    return {
        "nlist": nlist, "nprobe": chosen, "calibration": calib, "reached": calib[-1]["recall"] >= target,
        "recall": calib[-1]["recall"], "train_s": train_s, "add_s": add_s, "search_s": search_s,
        "seconds": train_s + add_s + search_s, "shards": len(shards), "coarse_s_once": coarse_s,
        "range_results": int(results * scale),
        "method": ("search extrapolated from {:,} sampled queries".format(query_max) if sampled else "measured")
        + (f" (database in {len(shards)} shards)" if len(shards) > 1 else ""),
    }


# ---------------------------------------------------------------------------------- one N
def bench_n(n: int, args: argparse.Namespace, work: Path) -> dict:
    tau = args.threshold
    root = work / f"n{n}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ds = write_dataset(root / "embeddings", n, args.d, tau, args.seed, args.file_rows, args.dtype, args.generated)
    print(f"\n=== N = {n:,}  d = {args.d}  τ = {tau}: {len(ds.files)} file pairs ({args.dtype}) written in {ds.seconds:.1f}s", flush=True)

    wh = root / "warehouse.duckdb"
    home = root / "dagster_home"
    cmd = [
        sys.executable, "-m", "dedup_assets.cli", "run", "--embeddings", str(ds.root), "--threshold", str(tau),
        "--warehouse", str(wh), "--dagster-home", str(home), "--generated-embeddings", str(ds.generated),
    ] + args.cli_arg
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_") and k != "DAGSTER_HOME"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    print("running: " + " ".join(cmd[1:]), flush=True)
    run = run_capped(cmd, args.cap_gb, env, args.timeout_s, root / "run.log")
    ok = run.rc == 0
    print(f"  run: rc {run.rc} in {run.wall_s:.1f}s, memory cap {args.cap_gb} GB by {run.method}"
          + (f" ({run.note})" if run.note else ""), flush=True)
    if not ok:
        print("  run output (tail):\n" + "\n".join("    " + ln for ln in run.output_tail.splitlines()[-25:]), flush=True)
    figs = asset_figures(home) if home.exists() else []
    # A check's step is named after its asset (e.g. image_index_image_index_ids_unique).
    corpus = [f for f in figs if not any(a.startswith(tuple(PER_PARTITION)) for a in f.asset.split(", "))]
    corpus_s = sum(f.seconds for f in corpus)
    pair_s = sum(f.seconds for f in corpus if not f.check and f.asset.startswith(("cluster", "candidate_pairs")))

    # Brute force: measured on all rows or on a random subset (rows come in random order).
    nb = min(n, args.brute_max)
    sub = ds.rows(np.arange(nb))
    t0 = time.perf_counter()
    exact_sub = brute_force_pairs(sub, tau, block_size=4096, device="cpu")
    brute_measured = time.perf_counter() - t0
    del sub
    brute_s = brute_measured * (n / nb) ** 2
    brute_method = "measured on all rows" if nb == n else f"measured on {nb:,} rows, scaled by (N/{nb:,})² (extrapolated)"

    # Recall: exact over all pairs when brute force ran on all rows, else over sampled rows.
    rng = np.random.default_rng([args.seed, 3])
    if nb == n:
        sample = np.arange(n)
        truth = truth_from_pairs(exact_sub.i, exact_sub.j, n)
    else:
        sample = np.sort(rng.choice(n, min(n, args.recall_sample), replace=False))
        truth = sampled_truth(ds, sample, tau)
    recall = recall_of(truth, run_partners(wh, sample), args.seed) if ok else {"recall": float("nan")}
    recall["method"] = "exact (all pairs)" if nb == n else f"sampled ({sample.size:,} random rows, exact neighbours over all N)"
    subset = {}
    if nb < n and ok:
        part = [p[p < nb] for p in run_partners(wh, np.arange(nb))]
        subset = recall_of(truth_from_pairs(exact_sub.i, exact_sub.j, nb), part, args.seed)
        subset["method"] = f"exact, all pairs among {nb:,} random rows"
    kinds = _pair_kinds(ds, truth)
    print(f"  truth: {recall.get('true_pairs', 0):,} true pairs incident to {sample.size:,} rows "
          f"({kinds['core_core']:.0%} core–core, {kinds['planted']:.0%} planted, {kinds['other']:.0%} other) "
          f"in {truth.seconds:.1f}s", flush=True)

    faiss_fig = {}
    if ok and not args.no_faiss:
        print(f"  faiss IVF: calibrating nprobe to recall {recall['recall']:.4f} …", flush=True)
        faiss_fig = faiss_ivf(ds, truth, tau, recall["recall"], args.faiss_max, args.seed, args.faiss_queries)

    audit = _audit_outcome(wh, ds) if ok else {}
    result = {
        "n": n, "d": args.d, "threshold": tau, "dtype": args.dtype, "files": len(ds.files), "generate_s": ds.seconds,
        "run_ok": ok, "rc": run.rc, "run_wall_s": run.wall_s,
        "memory": {
            "cap_gb": args.cap_gb, "method": run.method, "note": run.note,
            "kernel_peak_gb": (run.kernel_peak / GB) if run.kernel_peak is not None else None,
            "peak_anon_gb": run.peak(2) / GB, "peak_summed_rss_gb": run.peak(3) / GB,
            "oom_kills": run.oom_kills, "killed_by_sampler": run.killed_by_sampler, "within_cap": ok and not run.oom_kills,
        },
        "assets": [
            {"asset": f.asset, "check": f.check, "steps": f.steps, "seconds": f.seconds, "rows": f.rows,
             "peak_anon_gb": max((run.peak(2, a, b) for a, b in f.windows), default=0) / GB,
             "peak_rss_gb": max((run.peak(3, a, b) for a, b in f.windows), default=0) / GB}
            for f in figs
        ],
        "corpus_stage_s": corpus_s, "pair_search_s": pair_s,
        "brute": {"seconds": brute_s, "measured_s": brute_measured, "rows": nb, "method": brute_method},
        "recall": recall, "recall_subset": subset, "truth_kinds": kinds,
        "faiss_ivf": faiss_fig, "audit": audit,
    }
    print_table(result)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _pair_kinds(ds: Dataset, truth: SampledTruth) -> dict:
    core_core = planted = other = 0
    for r, parts in zip(truth.rows, truth.partners):
        pl = (ds.planted[r] >= 0) & (ds.planted[parts] == ds.planted[r])
        cc = ds.core[r] & ds.core[parts] & (ds.topic[parts] == ds.topic[r])
        planted += int(pl.sum())
        core_core += int((cc & ~pl).sum())
        other += int((~cc & ~pl).sum())
    tot = max(1, core_core + planted + other)
    return {"core_core": core_core / tot, "planted": planted / tot, "other": other / tot}


def _audit_outcome(wh: Path, ds: Dataset) -> dict:
    import duckdb

    con = duckdb.connect(str(wh), read_only=True)
    try:
        rows = con.sql("SELECT generated, image_id, flagged FROM regurgitation_audit WHERE rank = 1").fetchall()
    except duckdb.Error as e:
        return {"error": str(e)}
    finally:
        con.close()
    copies = {r[0]: r for r in rows if "copy_" in r[0]}
    novel = [r for r in rows if "novel_" in r[0]]
    hit = sum(1 for g, img, fl in copies.values() if fl and row_of(img) == row_of(g))
    return {"generated": len(rows), "copies": len(copies), "copies_found_at_rank1": hit,
            "novel_flagged": sum(1 for r in novel if r[2])}


# ---------------------------------------------------------------------------------- output
def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(r: dict) -> None:
    m = r["memory"]
    print(f"  memory: kernel peak {_gb(m['kernel_peak_gb'])} GB (incl. page cache), anon {_gb(m['peak_anon_gb'])} GB, "
          f"summed RSS {_gb(m['peak_summed_rss_gb'])} GB (sampled every 0.2 s); cap {m['cap_gb']} GB by {m['method']}; "
          f"OOM kills {m['oom_kills']}")
    head = f"  {'asset (or check)':<46}{'steps':>6}{'time s':>9}{'rows':>12}{'peak anon GB':>14}{'peak RSS GB':>13}"
    print(head + "\n  " + "-" * (len(head) - 2))
    for a in r["assets"]:
        print(f"  {a['asset'][:45]:<46}{a['steps']:>6}{a['seconds']:>9.1f}{a['rows']:>12,}{a['peak_anon_gb']:>14.2f}{a['peak_rss_gb']:>13.2f}")
    b = r["brute"]
    print(f"  baseline exact brute force: {b['seconds']:.1f}s ({b['method']}) = 1.00")
    rows = [("corpus stage (all corpus assets)", r["corpus_stage_s"]), ("  pair search (clusterings → candidate_pairs)", r["pair_search_s"])]
    f = r["faiss_ivf"]
    if f:
        rows.append((f"faiss IVF (nlist {f['nlist']}, nprobe {f['nprobe']}, recall {f['recall']:.4f})", f["seconds"]))
        print(f"  faiss: {f['method']}; train {f['train_s']:.1f}s, add {f['add_s']:.1f}s, search {f['search_s']:.1f}s")
    for label, s in rows:
        print(f"  {label:<60}{s:>9.1f}s  × brute {s / b['seconds']:.4f}" + (f"  × faiss {s / f['seconds']:.2f}" if f and not label.startswith("faiss") else ""))
    rc = r["recall"]
    if "ci_low" in rc:
        print(f"  recall of all pairs ≥ τ: {rc['recall']:.4f} [{rc['ci_low']:.4f}, {rc['ci_high']:.4f}] over {rc['true_pairs']:,} true pairs — {rc['method']}")
    if r["recall_subset"]:
        s = r["recall_subset"]
        print(f"  recall, {s['method']}: {s['recall']:.4f} over {s['true_pairs']:,} pairs")
    if r["audit"]:
        a = r["audit"]
        print(f"  audit: {a.get('copies_found_at_rank1', 0)}/{a.get('copies', 0)} generated near-copies found at rank 1 and flagged; "
              f"{a.get('novel_flagged', 0)} novel ones flagged")


def targets(results: list[dict]) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    for r in results:
        n = f"N={r['n']:,}"
        out.append((f"{n}: whole run within the {r['memory']['cap_gb']} GB cap", bool(r["memory"]["within_cap"]), r["memory"]["method"]))
        rec = r["recall"].get("recall", float("nan"))
        out.append((f"{n}: recall ≥ 0.99", rec >= 0.99 if r["run_ok"] else False, f"{rec:.4f}"))
        ratio = r["corpus_stage_s"] / r["brute"]["seconds"]
        out.append((f"{n}: corpus stage ≤ 1/10 of brute force", ratio <= 0.1 if r["run_ok"] else False, f"{ratio:.4f}×"))
        if r["faiss_ivf"]:
            fr = r["corpus_stage_s"] / r["faiss_ivf"]["seconds"]
            out.append((f"{n}: no slower than faiss IVF at equal recall", fr <= 1.0, f"{fr:.2f}×"))
    ok = [r for r in results if r["run_ok"]]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        e = math.log(b["corpus_stage_s"] / a["corpus_stage_s"]) / math.log(b["n"] / a["n"])
        out.append((f"time grows no faster than N^1.2 ({a['n']:,} → {b['n']:,})", e <= 1.2, f"N^{e:.2f}"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    p.add_argument("--quick", action="store_true", help="N = 3,000 in 2 file pairs: the whole path, under a minute")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--threshold", type=float, default=0.909, help="τ for the data model, the run and every baseline")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="of the npy files")
    p.add_argument("--file-rows", type=int, default=250_000, help="rows per img_emb/metadata file pair")
    p.add_argument("--generated", type=int, default=200, help="generated vectors for the audit (half near-copies)")
    p.add_argument("--cap-gb", type=float, default=3.0, help="hard memory cap of the run's process tree")
    p.add_argument("--timeout-s", type=float, default=3 * 3600)
    p.add_argument("--brute-max", type=int, default=50_000, help="largest N brute-forced in full")
    p.add_argument("--recall-sample", type=int, default=3000, help="rows with exact neighbours above --brute-max")
    p.add_argument("--faiss-max", type=int, default=1_000_000, help="rows per faiss database shard")
    p.add_argument("--faiss-queries", type=int, default=100_000,
                   help="above this N, faiss range-searches a random sample of this many rows and scales its time by N/sample")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--cli-arg", action="append", default=[], help="extra argument for `dedup-assets run` (repeatable)")
    p.add_argument("--work", help="working folder (default: a temp folder); needs ~N·d·(2 + 4) bytes")
    p.add_argument("--keep", action="store_true", help="keep the data, warehouse and DAGSTER_HOME")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.file_rows, args.recall_sample, args.generated = [3000], 1500, 3000, 20
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_corpus_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [bench_n(n, args, work) for n in args.n]
    print("\ntargets:")
    tg = targets(results)
    for label, passed, value in tg:
        print(f"  [{'pass' if passed else 'FAIL'}] {label}: {value}")
    print(f"total wall time {time.perf_counter() - started:.0f}s (shared machine: timings vary with its load)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "results": results, "targets": [{"target": t, "pass": p_, "value": v} for t, p_, v in tg]},
            indent=2, default=str,
        ))
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["run_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
