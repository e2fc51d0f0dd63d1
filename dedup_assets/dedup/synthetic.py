"""Synthetic CLIP-like image embeddings with planted near-duplicates, for tests and benchmarks.

Grain: one row per synthetic image; every row is an L2-normalized float32 vector.

What makes them realistic enough to measure a candidate search on:

* Rows share a common mean direction (CLIP embeddings of unrelated images still have cosine
  ~0.3), belong to topics whose sizes follow a Zipf law (a few huge topics that k-means must cut
  into many clusters, a long tail of small ones), and vary inside their topic mostly along a
  shared low-rank subspace whose variance decays over its directions (1/rank), plus a little
  isotropic noise.
* Planted duplicate groups: a seed row and 1..`max_copies` copies whose cosine to the seed is
  drawn uniformly from [0.90, 0.99]. Group sizes have a heavy tail (a few images are copied
  dozens of times, like memes or stock photos).
* Planted chains: each item is a small step (cosine 0.955–0.985) from the previous one, like a
  clock whose hand moves a little on every copy, so neighbours are duplicates while the ends
  drift below any sensible threshold; connected components chain them together.
* The perturbation of a copy lies partly in the same low-rank subspace that carries the
  within-topic variance. That subspace is where k-means draws its boundaries, so copies cross
  cluster boundaries at least as often as real near-duplicates do: with the defaults one
  clustering (K by `choose_k`) misses ~8% of the pairs at n = 20,000, ~15% at 100,000 and ~36%
  at 1,000,000; five miss ~0.5%, 1% and 4% (DALL·E 2 reported 15% and 3% on real data).
  Isotropic noise alone would almost never move a copy across a boundary and would make the
  benchmark meaningless.

Everything is generated in float32 and in chunks: n = 1,000,000 × 512 needs ~2 GB (the output)
plus a few tens of MB.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_embeddings", "perturb_to_cosine"]

_CHUNK = 65_536


def _normalize_rows(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    a /= norms
    return a


def perturb_to_cosine(
    seeds: np.ndarray,
    cosines: np.ndarray,
    rng: np.random.Generator,
    basis: np.ndarray | None = None,
    lowrank_share: float = 0.0,
) -> np.ndarray:
    """Unit vectors whose cosine to each (unit) seed row is exactly the requested value.

    The direction of the move is a mix of a random direction inside `basis` (share
    `lowrank_share` of its energy) and an isotropic one, made orthogonal to the seed.
    """
    m, d = seeds.shape
    iso = rng.standard_normal((m, d), dtype=np.float32)
    _normalize_rows(iso)
    if basis is not None and lowrank_share > 0:
        low = rng.standard_normal((m, basis.shape[1]), dtype=np.float32) @ basis.T
        _normalize_rows(low)
        direction = np.sqrt(np.float32(lowrank_share)) * low + np.sqrt(np.float32(1 - lowrank_share)) * iso
    else:
        direction = iso
    # Remove the seed component so the requested cosine is exact.
    direction -= np.sum(direction * seeds, axis=1, keepdims=True) * seeds
    _normalize_rows(direction)
    c = cosines.astype(np.float32)[:, None]
    out = c * seeds + np.sqrt(np.maximum(0.0, 1.0 - c * c)) * direction
    return _normalize_rows(out.astype(np.float32, copy=False))


def make_embeddings(
    n: int,
    d: int = 512,
    seed: int = 0,
    n_topics: int | None = None,
    dup_fraction: float = 0.08,
    chain_fraction: float = 0.01,
    rank: int = 32,
    zipf_exponent: float = 1.0,
    lowrank_share: float = 0.7,
    spectrum_decay: float = 1.0,
    max_copies: int = 64,
    chain_length: tuple[int, int] = (4, 12),
    dup_cosine: tuple[float, float] = (0.90, 0.99),
    chain_step_cosine: tuple[float, float] = (0.955, 0.985),
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `n` unit-norm embeddings of dimension `d` with planted near-duplicates.

    Args:
        n_topics: number of topics (None → max(4, n // 2000)); topic t = 1, 2, … gets a share
            of the rows ∝ 1 / t**zipf_exponent.
        dup_fraction: fraction of rows that are copies of a seed row (seeds themselves not counted).
        chain_fraction: fraction of rows that are chain steps (after the chain's first item).
        rank: dimension of the subspace that carries within-topic variance and part of each
            copy's perturbation.
        lowrank_share: share of a copy's perturbation energy inside that subspace (0 = isotropic
            noise only: copies almost never cross k-means boundaries).
        spectrum_decay: variance of the subspace's t-th direction ∝ 1 / t**spectrum_decay.
        max_copies: cap on the copies of one seed (copy counts follow a Zipf(2) law).
        chain_length: (min, max) steps of one chain.
        dup_cosine: range of a copy's cosine to its seed; chain_step_cosine: of one chain step.

    Returns:
        (x, planted_group): x is (n, d) float32 with unit rows; planted_group is (n,) int64, the
        planted group (duplicate group or chain) of each row and -1 for rows that were not planted.
        Rows are in random order: planted rows are scattered among the others.
    """
    if n < 0 or d < 2:
        raise ValueError(f"need n >= 0 and d >= 2, got n={n}, d={d}")
    if not (0 <= dup_fraction < 1 and 0 <= chain_fraction < 1 and dup_fraction + chain_fraction < 0.9):
        raise ValueError("dup_fraction and chain_fraction must be in [0, 1) and sum to less than 0.9")
    if not 0 <= lowrank_share <= 1:
        raise ValueError(f"lowrank_share must be in [0, 1], got {lowrank_share}")
    rng = np.random.default_rng(seed)
    planted = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32), planted

    rank = max(1, min(rank, d - 1))
    n_topics = max(1, n_topics if n_topics is not None else max(4, n // 2000))
    # Weights of the four parts (squared norms): common direction, topic, low-rank, isotropic.
    # Unrelated rows have cosine ~0.3, rows of one topic ~0.55: far below a duplicate threshold.
    w_common, w_topic, w_low, w_iso = 0.30, 0.25, 0.30, 0.15

    common = rng.standard_normal(d).astype(np.float32)
    common /= np.linalg.norm(common)
    topics = _normalize_rows(rng.standard_normal((n_topics, d), dtype=np.float32))
    basis, _ = np.linalg.qr(rng.standard_normal((d, rank)).astype(np.float32))
    # Decaying spectrum: a few directions carry most within-topic variance, as in real
    # embeddings; k-means cuts across exactly those directions.
    spectrum = (1.0 / np.arange(1, rank + 1, dtype=np.float64) ** spectrum_decay) ** 0.5
    spectrum *= np.sqrt(rank / np.sum(spectrum**2))
    basis = np.ascontiguousarray(basis * spectrum.astype(np.float32), dtype=np.float32)  # (d, rank)

    p = 1.0 / np.arange(1, n_topics + 1, dtype=np.float64) ** zipf_exponent
    topic_of = rng.choice(n_topics, size=n, p=p / p.sum())

    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        m = e - s
        z = rng.standard_normal((m, rank), dtype=np.float32) / np.float32(np.sqrt(rank))
        iso = rng.standard_normal((m, d), dtype=np.float32) / np.float32(np.sqrt(d))
        block = (
            np.float32(np.sqrt(w_common)) * common
            + np.float32(np.sqrt(w_topic)) * topics[topic_of[s:e]]
            + np.float32(np.sqrt(w_low)) * (z @ basis.T)
            + np.float32(np.sqrt(w_iso)) * iso
        )
        x[s:e] = _normalize_rows(block)

    # Base rows are i.i.d., so overwriting randomly chosen rows with copies is the same as
    # shuffling planted rows among the others, without a second (n, d) buffer.
    order = rng.permutation(n)
    cursor = 0
    group = 0

    n_copies_target = int(round(dup_fraction * n))
    while n_copies_target > 0 and cursor + 2 <= n:
        k = int(min(max_copies, rng.zipf(2.0), n_copies_target, n - cursor - 1))
        seed_row = order[cursor]
        rows = order[cursor + 1 : cursor + 1 + k]
        cos = rng.uniform(dup_cosine[0], dup_cosine[1], size=k)
        x[rows] = perturb_to_cosine(np.repeat(x[seed_row][None, :], k, axis=0), cos, rng, basis, lowrank_share)
        planted[seed_row] = group
        planted[rows] = group
        group += 1
        cursor += 1 + k
        n_copies_target -= k

    n_steps_target = int(round(chain_fraction * n))
    while n_steps_target > 0 and cursor + 2 <= n:
        length = int(min(rng.integers(chain_length[0], chain_length[1] + 1), n_steps_target, n - cursor - 1))
        rows = order[cursor : cursor + 1 + length]
        for a, b in zip(rows[:-1], rows[1:]):
            cos = rng.uniform(chain_step_cosine[0], chain_step_cosine[1], size=1)
            x[b] = perturb_to_cosine(x[a][None, :], cos, rng, basis, lowrank_share)[0]
        planted[rows] = group
        group += 1
        cursor += 1 + length
        n_steps_target -= length
    return x, planted
