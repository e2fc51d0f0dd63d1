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

`TopicCoreEmbeddings` is a second data model, in which most pairs ≥ τ are NOT planted: every topic
has its own low-dimensional subspace and a dense core in it, so different images of one topic's
core are near neighbours of each other (see its docstring). It streams fixed-size chunks, so any N
fits in memory.
"""

from __future__ import annotations

import numpy as np

from dedup_assets.embed.base import l2_normalize

__all__ = ["TopicCoreEmbeddings", "make_embeddings", "perturb_to_cosine"]

_CHUNK = 65_536


def _normalize_rows(a: np.ndarray) -> np.ndarray:
    return l2_normalize(a, dtype=None)  # keeps float64 where the generator works in float64


def perturb_to_cosine(
    seeds: np.ndarray,
    cosines: np.ndarray,
    rng: np.random.Generator,
    basis: np.ndarray | None = None,
    lowrank_share: float = 0.0,
) -> np.ndarray:
    """Unit vectors whose cosine to each (unit) seed row is exactly the requested value.

    The direction of the move is a mix of a random direction inside `basis` (share
    `lowrank_share` of its energy) and an isotropic one, made orthogonal to the seed. `basis` is
    one (d, rank) subspace for every row, or (m, rank, d): one subspace per row.
    """
    m, d = seeds.shape
    iso = rng.standard_normal((m, d), dtype=np.float32)
    iso = _normalize_rows(iso)
    if basis is not None and basis.ndim == 3 and lowrank_share > 0:
        low = np.einsum("mr,mrd->md", rng.standard_normal((m, basis.shape[1]), dtype=np.float32), basis)
        low = _normalize_rows(low)
        direction = np.sqrt(np.float32(lowrank_share)) * low + np.sqrt(np.float32(1 - lowrank_share)) * iso
    elif basis is not None and lowrank_share > 0:
        low = rng.standard_normal((m, basis.shape[1]), dtype=np.float32) @ basis.T
        low = _normalize_rows(low)
        direction = np.sqrt(np.float32(lowrank_share)) * low + np.sqrt(np.float32(1 - lowrank_share)) * iso
    else:
        direction = iso
    # Remove the seed component so the requested cosine is exact.
    direction -= np.sum(direction * seeds, axis=1, keepdims=True) * seeds
    direction = _normalize_rows(direction)
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


def _core_pair_probability(rank: int, tau: float, iso_energy: float, spreads: np.ndarray, seed: int) -> np.ndarray:
    """P(cos ≥ tau) of two rows of one topic core, for each spread s (Monte Carlo, 2M pairs).

    A row is m + s·B·z + iso with m the unit topic mean, B an orthonormal (rank-dim) basis ⟂ m,
    z ~ N(0, I) and iso of energy `iso_energy` spread over all d dimensions (nearly orthogonal to
    everything else), so cos = (1 + s²·z₁·z₂) / √((1 + s²|z₁|² + e)(1 + s²|z₂|² + e)).
    """
    rng = np.random.default_rng([seed, 7])
    hits = np.zeros(spreads.size, dtype=np.int64)
    total = 0
    for _ in range(8):
        z1 = rng.standard_normal((250_000, rank))
        z2 = rng.standard_normal((250_000, rank))
        a, b, c = np.sum(z1 * z1, 1), np.sum(z2 * z2, 1), np.sum(z1 * z2, 1)
        for i, sp in enumerate(spreads):
            s2 = sp * sp
            cos = (1 + s2 * c) / np.sqrt((1 + s2 * a + iso_energy) * (1 + s2 * b + iso_energy))
            hits[i] += int(np.count_nonzero(cos >= tau))
        total += a.size
    return hits / total


class TopicCoreEmbeddings:
    """Synthetic embeddings where most near-neighbour pairs are different images in dense topic cores.

    Grain: one unit float32 row per synthetic image, produced in chunks of `CHUNK_ROWS` rows
    (`chunks()`), deterministic for the arguments whatever the caller does with the chunks.

    Model: topic t (sizes ∝ 1/t**zipf_exponent, one topic per `rows_per_topic` rows) has a unit mean
    mᵗ (cosine ~0.3 to other topics' means) and its own `rank`-dimensional subspace Bᵗ ⟂ mᵗ. A row
    is mᵗ + s·Bᵗz (z ~ N(0, I)) plus isotropic noise of energy `iso_energy`, normalized. A share
    `core_fraction` of a topic's rows is its core: s = sᵗ, chosen (by `_core_pair_probability`) so
    that a core row has on average `core_degree` core neighbours with cosine ≥ `tau` whatever the
    topic's size — big topics get wider cores, not denser ones, and k-means must cut through them.
    The other rows are the halo (s = `halo_spread`·sᵗ), where pairs ≥ τ are rare. On top,
    `dup_fraction` of the rows are planted near-copies (cosine to their seed uniform in
    `dup_cosine`, moved partly inside the seed's topic subspace) of seeds drawn like any row, in
    groups whose size follows Zipf(2) capped at `max_copies`; copies and seeds land anywhere in the
    stream. With the defaults (n = 40,000, d = 512) 72 % of the pairs ≥ τ join two core rows, 18 % a
    core and a halo row of one topic and 10 % are planted; none join two topics.

    Each chunk is (x (m, d) float32, planted (m,) int64 group or -1, topic (m,) int32, core (m,) bool).
    """

    CHUNK_ROWS = 65_536

    def __init__(
        self,
        n: int,
        d: int = 512,
        seed: int = 0,
        tau: float = 0.909,
        rows_per_topic: int = 2000,
        zipf_exponent: float = 1.0,
        rank: int = 8,
        core_fraction: float = 0.6,
        core_degree: float = 6.0,
        halo_spread: float = 3.0,
        iso_energy: float = 0.01,
        dup_fraction: float = 0.05,
        max_copies: int = 32,
        dup_cosine: tuple[float, float] = (0.92, 0.99),
        lowrank_share: float = 0.7,
        common_cosine: float = 0.3,
    ) -> None:
        if n < 0 or d < rank + 2:
            raise ValueError(f"need n >= 0 and d >= rank + 2, got n={n}, d={d}, rank={rank}")
        if not 0 < core_fraction <= 1 or not 0 <= dup_fraction < 0.5 or core_degree <= 0:
            raise ValueError("need 0 < core_fraction <= 1, 0 <= dup_fraction < 0.5 and core_degree > 0")
        if not -1 < tau < 1 or not dup_cosine[0] <= dup_cosine[1] < 1:
            raise ValueError(f"tau must be a cosine in (-1, 1) and dup_cosine a range below 1; got {tau}, {dup_cosine}")
        self.n, self.d, self.seed, self.tau, self.rank = n, d, seed, tau, rank
        self.core_fraction, self.halo_spread, self.iso_energy = core_fraction, halo_spread, iso_energy
        self.dup_cosine, self.lowrank_share = dup_cosine, lowrank_share
        rng = np.random.default_rng([seed, 0])
        self.n_topics = t = max(4, n // max(1, rows_per_topic))
        p = 1.0 / np.arange(1, t + 1, dtype=np.float64) ** zipf_exponent
        self.topic_p = p / p.sum()
        common = rng.standard_normal(d)
        common /= np.linalg.norm(common)
        own = _normalize_rows(rng.standard_normal((t, d)))
        self.means = _normalize_rows(
            (np.sqrt(common_cosine) * common + np.sqrt(1 - common_cosine) * own).astype(np.float32)
        )
        bases = np.empty((t, rank, d), dtype=np.float32)
        for i in range(t):
            q, _ = np.linalg.qr(np.column_stack([self.means[i], rng.standard_normal((d, rank))]))
            bases[i] = q[:, 1:].T  # orthonormal, orthogonal to the topic mean
        self.bases = bases
        # Core spread per topic: P(pair ≥ τ) = core_degree / (expected core size - 1).
        grid = np.geomspace(0.02, 5.0, 80)
        prob = _core_pair_probability(rank, tau, iso_energy, grid, seed)
        core_size = np.maximum(2.0, n * self.topic_p * core_fraction)
        want = np.clip(core_degree / (core_size - 1), 1e-7, 0.999)
        ok = prob > 0  # prob falls with the spread; interpolate log P over the spread grid
        lp = np.log(prob[ok][::-1])
        self.core_spread = np.interp(np.log(want), lp, grid[ok][::-1]).astype(np.float32)

        # Planted groups: which rows are seeds and copies, and the seed vectors.
        n_copies = int(round(dup_fraction * n))
        sizes: list[int] = []
        left = n_copies
        while left > 0:
            k = int(min(max_copies, rng.zipf(2.0), left))
            sizes.append(k)
            left -= k
        n_planted = n_copies + len(sizes)  # ≤ 2·dup_fraction·n < n
        rows = rng.choice(n, size=n_planted, replace=False) if n_planted else np.zeros(0, np.int64)
        self.group_of = np.full(n, -1, dtype=np.int32)
        self.is_seed = np.zeros(n, dtype=bool)
        cursor = 0
        for g, k in enumerate(sizes):
            members = rows[cursor : cursor + 1 + k]
            self.group_of[members] = g
            self.is_seed[members[0]] = True
            cursor += 1 + k
        g_topic = rng.choice(t, size=len(sizes), p=self.topic_p).astype(np.int32)
        g_core = rng.random(len(sizes)) < core_fraction
        self.group_topic = g_topic
        self.seeds = self._rows(g_topic, g_core, rng)

    def _rows(self, topic: np.ndarray, core: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = topic.size
        spread = self.core_spread[topic] * np.where(core, 1.0, self.halo_spread).astype(np.float32)
        z = rng.standard_normal((m, self.rank), dtype=np.float32) * spread[:, None]
        out = self.means[topic] + np.einsum("mr,mrd->md", z, self.bases[topic])
        out += rng.standard_normal((m, self.d), dtype=np.float32) * np.float32(np.sqrt(self.iso_energy / self.d))
        return _normalize_rows(out)

    def chunks(self):
        """Yield (x, planted, topic, core) for rows [0, CHUNK_ROWS), [CHUNK_ROWS, 2·CHUNK_ROWS), …"""
        for c, s in enumerate(range(0, self.n, self.CHUNK_ROWS)):
            e = min(self.n, s + self.CHUNK_ROWS)
            rng = np.random.default_rng([self.seed, 1, c])
            topic = rng.choice(self.n_topics, size=e - s, p=self.topic_p).astype(np.int32)
            core = rng.random(e - s) < self.core_fraction
            group = self.group_of[s:e].astype(np.int64)
            planted = group >= 0
            topic[planted] = self.group_topic[group[planted]]
            x = np.empty((e - s, self.d), dtype=np.float32)
            for b in range(0, e - s, 4096):  # the per-row basis gather is (rows, rank, d)
                sl = slice(b, min(e - s, b + 4096))
                x[sl] = self._rows(topic[sl], core[sl], rng)
            seeds = np.flatnonzero(self.is_seed[s:e])
            x[seeds] = self.seeds[group[seeds]]
            copies = np.flatnonzero(planted & ~self.is_seed[s:e])
            if copies.size:
                g = group[copies]
                cos = rng.uniform(self.dup_cosine[0], self.dup_cosine[1], size=copies.size)
                x[copies] = perturb_to_cosine(
                    self.seeds[g], cos, rng, self.bases[self.group_topic[g]], self.lowrank_share
                )
            core[planted] = False  # a planted row is counted as planted, not as core
            yield x, group, topic, core

    def all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every chunk concatenated (small n only: tests)."""
        parts = list(self.chunks())
        if not parts:
            return (np.zeros((0, self.d), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, bool))
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]
