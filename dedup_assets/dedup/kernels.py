"""The pair-search kernel: every pair of rows whose cosine reaches a threshold, on the CPU or one GPU.

Grain: one call searches one matrix (all pairs i < j of `a`) or two (every `a` row against every
`b` row) — in practice one cluster or one bucket of clusters, handed over by the caller, so that
neither host nor device memory ever holds what grows with the corpus. Results are host arrays
(int64 i, int64 j, float32 sim) sorted by (i, j).

The work is cut into blocks of at most block_size × block_size similarities:
- CPU: numpy matmul (BLAS sgemm, all cores) per block, threshold, keep the hits.
- CUDA (torch): the call's rows are copied to the device in panels, each block is an fp16 GEMM
  (tensor cores); every similarity that lands within a provable error margin below τ becomes a
  candidate and is re-scored in float32 (no TF32), so the GPU returns the same pairs as the CPU
  (see `fp16_margin`). Hits stay on the device until the call ends (or a flush limit is reached)
  and then move to the host in one copy.

One device per process: `resolve_device` turns "auto" / "cuda" into one "cuda:N" for the whole
process (rules in its docstring); a Dagster step in the `gpu` pool is one process, so it uses one
GPU, and the pool limit (dagster.yaml) should equal the number of GPUs of a machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import math
import os
import tempfile
import threading
from typing import Iterator

import numpy as np

__all__ = [
    "block_comparisons",
    "block_pairs",
    "check_search_args",
    "describe_backend",
    "fp16_margin",
    "fp32_matmul_precision",
    "resolve_device",
    "validate_device",
]

_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_S = np.zeros(0, np.float32)


# --------------------------------------------------------------------------------------------
# Device resolution: one device per process


_claim_lock = threading.Lock()
_claimed: dict[str, object] = {}  # "index" -> int, "file" -> the open lock file (kept for the process life)


def _has_gpu_node() -> bool:
    """A GPU device node exists (cheap test, so CPU-only runs never import torch for "auto")."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/dxg"))


def _torch_cuda_count() -> int:
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _lock_dir() -> str:
    return os.environ.get("DEDUP_ASSETS_GPU_LOCK_DIR") or os.path.join(tempfile.gettempdir(), "dedup-assets-gpu-locks")


def claim_gpu_index(count: int, lock_dir: str | None = None) -> int:
    """The GPU index this process uses when several are visible and nothing pins one.

    Order: `LOCAL_RANK` (torchrun / accelerate style launchers) modulo `count`; otherwise the first
    index whose lock file `<lock_dir>/gpu-<i>.lock` this process can `flock` — held until the
    process exits, so concurrent Dagster steps on one machine (the `gpu` pool, limit = number of
    GPUs) each take a different GPU; when every GPU is held (pool limit above the GPU count), the
    process shares `pid % count`. The answer is fixed for the life of the process.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with _claim_lock:
        if "index" in _claimed:
            return int(_claimed["index"])  # type: ignore[arg-type]
        rank = os.environ.get("LOCAL_RANK")
        if rank is not None and rank.strip().isdigit():
            index = int(rank) % count
        else:
            index = os.getpid() % count
            folder = lock_dir or _lock_dir()
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                f = open(os.path.join(folder, f"gpu-{i}.lock"), "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    continue
                _claimed["file"] = f
                index = i
                break
        _claimed["index"] = index
        return index


def validate_device(device: str) -> str:
    """The device string normalized ("auto", "cpu", "cuda" or "cuda:N"), without probing any GPU;
    anything else raises a ValueError (for configs that validate on construction)."""
    dev = device.strip().lower() if isinstance(device, str) else None
    if dev in ("auto", "cpu", "cuda") or (dev is not None and dev.startswith("cuda:") and dev[5:].isdigit()):
        return dev
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def resolve_device(device: str) -> str:
    """"auto" | "cpu" | "cuda" | "cuda:N" → "cpu" or "cuda:N" (one device per process).

    - "cpu" → "cpu". "auto" → "cpu" when the machine has no GPU device node or torch sees no CUDA
      GPU (without a node torch is not even imported), else what "cuda" gives.
    - "cuda" → the process's GPU: with one visible GPU (CUDA_VISIBLE_DEVICES=3 makes physical GPU 3
      the only one, index 0 — the way a Celery worker per GPU or a Kubernetes pod requesting
      `nvidia.com/gpu: 1` is pinned) "cuda:0"; with several, `claim_gpu_index` (LOCAL_RANK, else
      a per-GPU lock file, so concurrent steps on one machine spread over the GPUs).
    - "cuda:N" → itself, when N is a visible index (indices count within CUDA_VISIBLE_DEVICES).
    "cuda" / "cuda:N" without a usable GPU raise a RuntimeError that says what to do.
    """
    dev = validate_device(device)
    if dev == "cpu":
        return "cpu"
    explicit = int(dev[5:]) if dev.startswith("cuda:") else None
    if dev == "auto" and not _has_gpu_node():
        return "cpu"
    count = _torch_cuda_count()
    if count == 0:
        if dev == "auto":
            return "cpu"
        why = "torch is not installed" if importlib.util.find_spec("torch") is None else "torch sees no CUDA GPU"
        raise RuntimeError(
            f"device={device!r} was requested but {why} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use device='auto' or 'cpu' on this machine"
        )
    if explicit is not None:
        if explicit >= count:
            raise RuntimeError(
                f"device={device!r} was requested but only {count} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); indices start at 0"
            )
        return f"cuda:{explicit}"
    return "cuda:0" if count == 1 else f"cuda:{claim_gpu_index(count)}"


# --------------------------------------------------------------------------------------------
# Backend description (one log line per step)


def _faiss_line() -> str:
    if importlib.util.find_spec("faiss") is None:
        return "faiss not installed (install the `cpu` extra for faiss-cpu)"
    try:
        import faiss
    except Exception as exc:  # a broken GPU build can fail at import: say so instead of crashing a log line
        return f"faiss import failed ({type(exc).__name__}: {exc})"
    version = getattr(faiss, "__version__", "?")
    options = faiss.get_compile_options().strip() if hasattr(faiss, "get_compile_options") else ""
    if hasattr(faiss, "StandardGpuResources"):
        build = f"gpu build, {faiss.get_num_gpus()} GPU(s) visible to faiss"
    else:
        build = "cpu build"
    return f"faiss {version} ({build}{', ' + options if options else ''})"


def _torch_line(resolved: str) -> str:
    if importlib.util.find_spec("torch") is None:
        return "torch not installed"
    import torch

    cuda = getattr(torch.version, "cuda", None)
    line = f"torch {torch.__version__} ({'cuda ' + cuda if cuda else 'cpu'} build)"
    if resolved.startswith("cuda"):
        index = int(resolved.split(":")[1])
        props = torch.cuda.get_device_properties(index)
        line += (
            f", {resolved} = {props.name} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
        )
    return line


def describe_backend(device: str) -> str:
    """One line for logs: the device this process uses for `device`, the faiss build and torch."""
    try:
        resolved = resolve_device(device)
    except RuntimeError as exc:
        return f"device {device!r} unusable: {exc}"
    parts = [f"device {resolved} (asked {device!r})", _faiss_line()]
    if resolved != "cpu" or importlib.util.find_spec("torch") is not None:
        parts.append(_torch_line(resolved))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The block grid


def check_search_args(threshold: float, block_size: int) -> None:
    """The threshold is a finite cosine in [-1, 1] and block_size an integer >= 1 (else ValueError)."""
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine and must lie in [-1, 1], got {threshold}")


def _check(a: np.ndarray, b: np.ndarray | None, threshold: float, block_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    check_search_args(threshold, block_size)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"a must be a 2-D (n, d) array, got shape {a.shape}")
    if b is not None:
        b = np.ascontiguousarray(b, dtype=np.float32)
        if b.ndim != 2 or b.shape[1] != a.shape[1]:
            raise ValueError(f"b must be a 2-D (m, {a.shape[1]}) array like a, got shape {b.shape}")
    return a, b


def _grid(n: int, m: int | None, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks (r0, r1, c0, c1): the upper triangle of n × n when m is None, else the n × m grid."""
    for r0 in range(0, n, block_size):
        r1 = min(n, r0 + block_size)
        if m is None:
            for c0 in range(r0, n, block_size):
                yield r0, r1, c0, min(n, c0 + block_size)
        else:
            for c0 in range(0, m, block_size):
                yield r0, r1, c0, min(m, c0 + block_size)


def block_comparisons(n: int, m: int | None, block_size: int) -> int:
    """Dot products `block_pairs` computes for n rows (m None: all pairs) or n × m rows.

    The triangle's diagonal blocks are computed in full, so with block_size ≥ n this is n².
    """
    if m is not None:
        return int(n) * int(m)
    full, rest = divmod(int(n), int(block_size))
    # full × full upper triangle of block_size² blocks (diagonal included), plus the ragged last
    # row of blocks: `full` blocks of rest × block_size and one rest × rest diagonal block.
    return full * (full + 1) // 2 * block_size**2 + full * rest * block_size + rest * rest


def _finish(parts_i: list, parts_j: list, parts_s: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts_i:
        return _EMPTY_I.copy(), _EMPTY_I.copy(), _EMPTY_S.copy()
    i = np.concatenate(parts_i).astype(np.int64, copy=False)
    j = np.concatenate(parts_j).astype(np.int64, copy=False)
    s = np.concatenate(parts_s).astype(np.float32, copy=False)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def _cpu_pairs(a: np.ndarray, b: np.ndarray | None, t: np.float32, block_size: int):
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    rhs = a if b is None else b
    for r0, r1, c0, c1 in _grid(a.shape[0], None if b is None else b.shape[0], block_size):
        s = a[r0:r1] @ rhs[c0:c1].T
        p, q = np.nonzero(s >= t)
        if b is None and c0 == r0:  # diagonal block: strict upper triangle (i < j, no self pairs)
            keep = p < q
            p, q = p[keep], q[keep]
        if p.size:
            out_s.append(s[p, q])
            out_i.append(p + r0)
            out_j.append(q + c0)
    return _finish(out_i, out_j, out_s)


def block_pairs(
    a: np.ndarray,
    b: np.ndarray | None,
    threshold: float,
    device: str = "cpu",
    block_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair with cosine ≥ threshold: (i < j within `a`) when b is None, else (i in a, j in b).

    a (n, d), b (m, d): float32 unit rows on the host. Returns host arrays (int64 i, int64 j,
    float32 sim) sorted by (i, j). `device` goes through `resolve_device`; on CUDA the result is
    the same set of pairs as on the CPU (float32 re-scoring near τ; a pair whose float32 cosine
    lies within float32 rounding (~1e-6) of τ may still fall either way, as between two BLAS
    libraries). Peak extra memory: block_size² similarities on the host (CPU) or the call's rows
    plus a few block_size² buffers on the device (CUDA, see `_cuda_pairs`).
    """
    a, b = _check(a, b, threshold, block_size)
    resolved = resolve_device(device)
    n = a.shape[0]
    if n == 0 or (b is None and n < 2) or (b is not None and b.shape[0] == 0):
        return _EMPTY_I.copy(), _EMPTY_I.copy(), _EMPTY_S.copy()
    t = np.float32(threshold)
    if resolved == "cpu":
        return _cpu_pairs(a, b, t, int(block_size))
    return _cuda_pairs(a, b, float(t), resolved, int(block_size))


# --------------------------------------------------------------------------------------------
# CUDA path (torch): fp16 GEMM per block, float32 re-scoring of the candidates near τ

U16 = 2.0**-11  # unit roundoff of float16 (10 stored mantissa bits, round to nearest)
U32 = 2.0**-24  # unit roundoff of float32
_FLUSH_PAIRS = 1 << 24  # hits kept on the device before they are moved to the host (~200 MB)


def fp16_margin(d: int, norm: float = 1.0) -> float:
    """How far below the true cosine an fp16 block similarity can land, for rows of dimension d
    whose norms are at most `norm` (1 for unit rows). Candidates are the block entries ≥ τ − margin.

    Bound on |ŝ − a·b| where ŝ is the fp16 GEMM entry (Higham, "Accuracy and Stability of
    Numerical Algorithms", §2-3, applied to each step):
    1. inputs rounded to fp16: â_k = a_k(1 + δ), |δ| ≤ u16 = 2⁻¹¹, so
       |â·b̂ − a·b| ≤ (2·u16 + u16²) Σ|a_k b_k| ≤ (2·u16 + u16²)·‖a‖‖b‖ (Cauchy-Schwarz); entries
       below 2⁻¹⁴ are subnormal in fp16 and carry an absolute error ≤ 2⁻²⁵ instead, which adds at
       most 2⁻²⁵·(‖a‖₁ + ‖b‖₁)·norm ≤ 2⁻²⁴·√d·norm²;
    2. products of fp16 numbers are exact in fp32 and cuBLAS accumulates in fp32 (we switch off
       torch's reduced-precision fp16 reduction): recursive summation adds ≤ d·u32·Σ|â_k b̂_k|,
       doubled because tensor-core accumulators may truncate instead of rounding to nearest;
    3. the fp16 result is rounded once more: ≤ u16·|ŝ| ≤ u16·norm².
    Sum for unit rows: 3·u16 + u16² + 2·d·u32 + 2⁻²⁴·√d — at d = 512 that is 1.53e-3. The margin
    is twice the bound (orders of evaluation inside cuBLAS kernels are not documented), 3.1e-3
    at d = 512: a pair at τ − 0.003 is re-scored, and no true hit can be left out.
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    nn = float(norm) ** 2
    bound = nn * (3 * U16 + U16**2 + 2 * d * U32) + 2.0**-24 * math.sqrt(d) * nn
    return 2.0 * bound


def _fp16_floor(x: float) -> float:
    """The largest float16 value ≤ x (a threshold rounded to fp16 must not move up)."""
    h = np.float16(x)
    if float(h) > x:
        h = np.nextafter(h, np.float16(-np.inf))
    return float(h)


@contextlib.contextmanager
def fp32_matmul_precision():
    """Full-precision matmuls while the block runs: IEEE float32 (no TF32) for the re-scoring
    GEMM and fp32 accumulation for fp16 GEMMs; the process's settings come back afterwards.

    torch ≥ 2.9 has the `fp32_precision` API, and mixing it with the legacy `allow_tf32` flag
    raises, so the legacy flag is only touched where the new API does not exist.
    """
    import torch

    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    saved_tf32 = matmul.fp32_precision if new_api else matmul.allow_tf32
    saved_red = matmul.allow_fp16_reduced_precision_reduction
    try:
        if new_api:
            matmul.fp32_precision = "ieee"
        else:
            matmul.allow_tf32 = False
        matmul.allow_fp16_reduced_precision_reduction = False
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction = saved_red
        if new_api:
            matmul.fp32_precision = saved_tf32
        else:
            matmul.allow_tf32 = saved_tf32


def _max_norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x)))) if x.size else 0.0


def _panel_rows(torch, dev, n_rhs: int, d: int, block_size: int) -> int:
    """Rows of the right-hand side resident on the device at once (a multiple of block_size):
    all of them when float32 + float16 copies take at most a quarter of the free memory."""
    if dev.type != "cuda":
        return max(block_size, -(-n_rhs // block_size) * block_size)
    free, _ = torch.cuda.mem_get_info(dev)
    # Leave room for the block buffers: a few block_size² fp16/fp32/bool matrices.
    budget = max(free // 4 - 12 * block_size * block_size, 6 * d * block_size)
    rows = max(block_size, int(budget // (6 * d)) // block_size * block_size)
    return min(rows, -(-n_rhs // block_size) * block_size)


def _torch_pairs(
    a: np.ndarray,
    b: np.ndarray | None,
    t: float,
    dev,
    block_size: int,
    panel_rows: int | None = None,
    flush_pairs: int = _FLUSH_PAIRS,
):
    """The fp16-GEMM search on a torch device (CUDA in production; the CPU device runs the same
    code in tests). Same block grid as `_cpu_pairs`; right-hand rows go to the device in panels
    (`_panel_rows`), left-hand rows one block at a time, so device memory is bounded by the panel."""
    import torch

    dev = torch.device(dev)
    within = b is None
    rhs = a if within else b
    n, m, d = a.shape[0], rhs.shape[0], a.shape[1]
    norm = max(_max_norm(a), _max_norm(rhs) if not within else 0.0, 1.0)
    low = _fp16_floor(t - fp16_margin(d, norm))
    t32 = float(np.float32(t))
    panel = panel_rows or _panel_rows(torch, dev, m, d, block_size)
    if panel % block_size:
        raise ValueError(f"panel_rows must be a multiple of block_size, got {panel} and {block_size}")
    # Gathering rows of a sparse block costs 2·d loads per candidate; past this many candidates
    # one float32 GEMM of the block (rows × cols × d) is cheaper.
    gather_chunk = max(1, (1 << 25) // d)

    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    dev_i: list = []
    dev_j: list = []
    dev_s: list = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        if dev_i:
            out_i.append(torch.cat(dev_i).cpu().numpy())
            out_j.append(torch.cat(dev_j).cpu().numpy())
            out_s.append(torch.cat(dev_s).cpu().numpy())
            for part in (dev_i, dev_j, dev_s):
                part.clear()
        pending = 0

    with torch.inference_mode(), fp32_matmul_precision():
        for p0 in range(0, m, panel):
            p1 = min(m, p0 + panel)
            b32 = torch.from_numpy(rhs[p0:p1]).to(dev)
            b16 = b32.half()
            for r0 in range(0, p1 if within else n, block_size):
                r1 = min(n, r0 + block_size)
                if within and r0 >= p0:
                    a32, a16 = b32[r0 - p0 : r1 - p0], b16[r0 - p0 : r1 - p0]
                else:
                    a32 = torch.from_numpy(a[r0:r1]).to(dev)
                    a16 = a32.half()
                for c0 in range(max(p0, r0) if within else p0, p1, block_size):
                    c1 = min(p1, c0 + block_size)
                    bc32, bc16 = b32[c0 - p0 : c1 - p0], b16[c0 - p0 : c1 - p0]
                    mask = (a16 @ bc16.T) >= low
                    if within and c0 == r0:  # diagonal block: strict upper triangle
                        mask = torch.triu(mask, diagonal=1)
                    p, q = torch.nonzero(mask, as_tuple=True)
                    del mask
                    k = int(p.numel())
                    if k == 0:
                        continue
                    if k * 32 > (r1 - r0) * (c1 - c0):
                        sim = (a32 @ bc32.T)[p, q]
                    else:
                        sim = torch.cat(
                            [
                                (a32[p[s : s + gather_chunk]] * bc32[q[s : s + gather_chunk]]).sum(dim=1)
                                for s in range(0, k, gather_chunk)
                            ]
                        )
                    keep = sim >= t32
                    p, q, sim = p[keep], q[keep], sim[keep]
                    if p.numel():
                        dev_i.append(p + r0)
                        dev_j.append(q + c0)
                        dev_s.append(sim)
                        pending += int(p.numel())
                        if pending >= flush_pairs:
                            flush()
        flush()
    return _finish(out_i, out_j, out_s)


def _cuda_pairs(a: np.ndarray, b: np.ndarray | None, t: float, device: str, block_size: int):
    return _torch_pairs(a, b, t, device, block_size)
