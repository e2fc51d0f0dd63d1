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

import fcntl
import glob
import importlib.util
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
    "resolve_device",
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
    if not isinstance(device, str):
        raise ValueError(f"device must be a string ('auto', 'cpu', 'cuda' or 'cuda:N'), got {device!r}")
    dev = device.strip().lower()
    if dev == "cpu":
        return "cpu"
    explicit: int | None = None
    if dev.startswith("cuda:"):
        tail = dev[5:]
        if not tail.isdigit():
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        explicit = int(tail)
    elif dev not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
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
# CUDA path


def _cuda_pairs(a, b, t, device, block_size):
    raise NotImplementedError("the CUDA pair search is not written yet; use device='cpu'")
