"""lego's work between the two Gram products and the centroids, in numpy alone (float64, on the CPU).

Every unit of a module's pool is the raw row a_i of the stacked A and column b_i of the stacked B, each
multiplied by a number: the split's weight and scale, a sign, the balancing ratio, a direction's
1/length. So a pool is two per-unit scalings (sa, sb) of the raw factors, and every inner product between
units, centroids or updates comes from the two P x P Grams G_A = A Aᵀ and G_B = Bᵀ B:
<u_i, u_j> = sa_i sa_j G_A,ij + sb_i sb_j G_B,ij. Here lego goes from those Grams to the coefficients
(Ca, Cb, k x P) of the merged factors A' = Ca A and B' = B Cbᵀ; the d-wide products on either side are
the caller's (``methods/lego.py`` with torch on any device, or the CLI's prefetch workers, prefetch.py,
before torch is imported: this module imports neither torch nor anything that does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .kmeans_core import COINCIDE_EPS, cluster_grams, draws_shape

UNIT_SPLITS = ("b", "sqrt")
CANONICALIZATIONS = ("none", "sign", "balance")
PARAM_REWEIGHTS = ("joint", "halves", "sum", "none")
OUTPUT_REWEIGHTS = ("sqrt", "linear", "none", "norm_mean", "norm_rms", "norm_sum", "norm_gain", "norm_geo")
# "direction" is not a canonicalisation of the pool (it changes units' lengths): it clusters the
# balanced units' directions, and the centroids then take their magnitude from param_reweight
LEGO_CANONICALIZATIONS = CANONICALIZATIONS + ("direction",)
# lego's options and their defaults (methods/lego.py documents them; the CLI's prefetch workers need them
# without importing torch)
LEGO_DEFAULTS = {"param_reweight": "joint", "output_reweight": "norm_geo", "unit_split": "b",
                 "canonicalize": "direction", "n_init": 10, "max_iter": 100}


def per_unit(ranks: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """One value per input, repeated over its units (float64)."""
    return np.repeat(np.array([float(v) for v in values], dtype=np.float64), list(ranks))


def unit_scales(ranks: Sequence[int], scales: Sequence[float], weights: Sequence[float], split: str = "b"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit multipliers of the raw (a_i, b_i) (B already carries its input's scale): "b" puts the weight
    on b; "sqrt" puts sqrt(|w s|) on each half and the sign on b (msu.units_from_factors)."""
    sa, sb = [], []
    for s, w in zip(scales, weights):
        if split == "b":
            ca, cb = 1.0, w
        elif split == "sqrt":
            s = s if s != 0 else 1.0
            c = w * s
            root = math.sqrt(abs(c))
            ca, cb = root, (1.0 if c >= 0 else -1.0) * root / s
        else:
            raise ValueError(f"unknown unit split {split!r}; expected one of {UNIT_SPLITS}")
        sa.append(ca)
        sb.append(cb)
    return per_unit(ranks, sa), per_unit(ranks, sb)


@dataclass
class GramPool:
    """One module's pooled units: unit i is (sa_i a_i, sb_i b_i) with a_i row i of ``A`` (P x d_in) and b_i
    column i of ``B`` (d_out x P), the inputs' raw factors stacked (held here for the caller, never read);
    ``GA`` = A Aᵀ, ``GB`` = Bᵀ B and the scalings are float64 numpy arrays."""

    GA: np.ndarray
    GB: np.ndarray
    sa: np.ndarray
    sb: np.ndarray
    A: Any = None
    B: Any = None

    def half_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """|sa_i a_i| and |sb_i b_i| for every unit."""
        return (np.abs(self.sa) * np.sqrt(np.maximum(np.diagonal(self.GA), 0.0)),
                np.abs(self.sb) * np.sqrt(np.maximum(np.diagonal(self.GB), 0.0)))

    def gram(self, sa: np.ndarray | None = None, sb: np.ndarray | None = None) -> np.ndarray:
        """Inner products of the units [sa_i a_i ; sb_i b_i] (default: the pool's own scalings)."""
        sa = self.sa if sa is None else sa
        sb = self.sb if sb is None else sb
        return np.outer(sa, sa) * self.GA + np.outer(sb, sb) * self.GB


def pool_from_grams(GA: np.ndarray, GB: np.ndarray, sign: np.ndarray, sa: np.ndarray, sb: np.ndarray,
                    canonicalize: str = "none") -> GramPool:
    """The pool of the raw factors' Grams with the units' scalings (``unit_scales``), canonicalised as
    scalings: a sign flip of both halves so that a's largest entry is positive (``sign``: that entry's sign
    per raw row; the split's multiplier of a is >= 0, so it is the unit's), then (balance) |a| = |b|."""
    if canonicalize not in CANONICALIZATIONS:
        raise ValueError(f"unknown canonicalisation {canonicalize!r}; expected one of {CANONICALIZATIONS}")
    pool = GramPool(GA, GB, sa, sb)
    if canonicalize == "none":
        return pool
    pool.sa, pool.sb = sa * sign, sb * sign
    if canonicalize == "balance":
        na, nb = pool.half_norms()
        ok = (na > 0) & (nb > 0)
        ratio = np.where(ok, np.sqrt(nb / np.where(ok, na, 1.0)), 1.0)
        pool.sa, pool.sb = pool.sa * ratio, pool.sb / ratio
    return pool


def direction_scales(pool: GramPool) -> tuple[np.ndarray, np.ndarray]:
    """Scalings that make every unit of unit length (zero units stay zero): the points "direction" clusters."""
    na, nb = pool.half_norms()
    norm = np.sqrt(na * na + nb * nb)
    norm = np.where(norm > 0, norm, 1.0)
    return pool.sa / norm, pool.sb / norm


def member_rescale(pool: GramPool, Ca: np.ndarray, Cb: np.ndarray, labels: np.ndarray,
                   how: str) -> tuple[np.ndarray, np.ndarray]:
    """Against norm decay (averaging unit vectors that point apart shrinks them): the factors (fa, fb) by
    which to multiply each centroid's a and b halves so that it has the mean norm of its members, as one
    vector ("joint") or each half on its own ("halves"); "sum" instead gives each centroid's rank-1 update
    |ā| |b̄| the summed update magnitude Σ |a_i| |b_i| of its members (both halves scaled alike): a cluster
    of m units carries m units' worth. Centroid j's halves are Σ_i Ca_ji a_i and Σ_i Cb_ji b_i, so their
    norms come from the Grams: |ā_j|² = (Ca G_A Caᵀ)_jj. A centroid of norm 0 gets factor 0."""
    Ca, Cb, labels = np.asarray(Ca), np.asarray(Cb), np.asarray(labels)
    k = Ca.shape[0]
    ones = np.ones(k, dtype=np.float64)
    if how == "none":
        return ones, ones
    if how not in PARAM_REWEIGHTS:
        raise ValueError(f"unknown parameter reweighting {how!r}; expected one of {PARAM_REWEIGHTS}")
    na, nb = pool.half_norms()  # the members' |a_i|, |b_i| (of the pooled units, not directions)
    have_a2 = np.maximum(((Ca @ pool.GA) * Ca).sum(1), 0.0)
    have_b2 = np.maximum(((Cb @ pool.GB) * Cb).sum(1), 0.0)
    counts = np.maximum(np.bincount(labels, minlength=k), 1).astype(np.float64)

    def per_cluster(values: np.ndarray) -> np.ndarray:
        out = np.zeros(k, dtype=np.float64)
        np.add.at(out, labels, values)  # in index order, as torch's index_add_ did
        return out

    def ratio(want: np.ndarray, have: np.ndarray) -> np.ndarray:
        return np.where(have > 0, want / np.where(have > 0, have, ones), 0.0)

    if how == "sum":
        f = np.sqrt(ratio(per_cluster(na * nb), np.sqrt(have_a2) * np.sqrt(have_b2)))
        return f, f
    if how == "joint":
        f = ratio(per_cluster(np.sqrt(na * na + nb * nb)) / counts, np.sqrt(have_a2 + have_b2))
        return f, f
    return ratio(per_cluster(na) / counts, np.sqrt(have_a2)), ratio(per_cluster(nb) / counts, np.sqrt(have_b2))


def update_norm_sq(GA: np.ndarray, GB: np.ndarray, Ca: np.ndarray, Cb: np.ndarray) -> float:
    """||B' A'||_F² for A' = Ca A and B' = B Cbᵀ: the sum of (B'ᵀB') ∘ (A'A'ᵀ), both k x k, from the Grams."""
    GA, GB, Ca, Cb = (np.asarray(x) for x in (GA, GB, Ca, Cb))
    return max(float(((Cb @ GB @ Cb.T) * (Ca @ GA @ Ca.T)).sum()), 0.0)


def norm_target(GA: np.ndarray, GB: np.ndarray, unit_weights: np.ndarray, ranks: Sequence[int], how: str) -> float:
    """The Frobenius norm a merged update is scaled to by the "norm_*" output reweightings, computed from
    the inputs alone: of the weighted mean Σ w_j ΔW_j / N ("norm_mean"), of the sum Σ w_j ΔW_j
    ("norm_sum"), or the root mean square of the inputs' own norms sqrt(Σ ||w_j ΔW_j||² / N)
    ("norm_rms": a typical input's strength, whatever the overlap between inputs).

    "norm_gain" is rms² / ||mean||: the rms when the inputs are one and the same update, growing to
    rms·sqrt(N) (the norm of the sum) as they become orthogonal, so the scale follows how little the
    inputs overlap. ||mean|| is floored at rms / sqrt(N), its value for orthogonal inputs, so that
    inputs which cancel (negative overlap) cannot blow the scale up: the target is at most rms·sqrt(N).
    "norm_geo" is the geometric mean of the two, sqrt(rms · gain).

    From the Grams of the stacked raw factors (float64, P x P), ``unit_weights`` the weight of each unit's
    input: ||Σ w_j B_j A_j||² is the sum of (w wᵀ ∘ BᵀB) ∘ (A Aᵀ), and input j's ||w_j ΔW_j||² the sum of
    its diagonal block (``ranks`` give the blocks)."""
    unit_weights = np.asarray(unit_weights)
    products = np.outer(unit_weights, unit_weights) * np.asarray(GB) * np.asarray(GA)
    edges = np.concatenate([[0], np.cumsum(list(ranks))]).tolist()
    own = [float(products[lo:hi, lo:hi].sum()) for lo, hi in zip(edges, edges[1:])]
    return norm_rule(own, float(products.sum()), how)


def norm_rule(own_sq: list[float], total_sq: float, how: str) -> float:
    """``norm_target`` from the inputs' squared norms ||w_j ΔW_j||² and that of their sum ||Σ w_j ΔW_j||²."""
    n = len(own_sq)
    rms = math.sqrt(sum(max(x, 0.0) for x in own_sq) / n)
    if how == "norm_rms":
        return rms
    total = math.sqrt(max(total_sq, 0.0))
    if how == "norm_sum":
        return total
    if how == "norm_mean":
        return total / n
    if how in ("norm_gain", "norm_geo"):
        if rms == 0.0:
            return 0.0
        gain = rms * rms / max(total / n, rms / math.sqrt(n))
        return gain if how == "norm_gain" else math.sqrt(rms * gain)
    raise ValueError(f"unknown norm target {how!r}")


def output_factor(mean_rank: float, k: int, how: str) -> float:
    """Against variance expansion: the merged update is multiplied by sqrt(r/k) ("sqrt"), r/k ("linear")
    or 1 ("none"), r the mean input rank of the module, k the clusters formed. (The "norm_*" choices
    are handled by ``output_scale``: they need the inputs.)"""
    if how == "none" or how.startswith("norm_"):
        return 1.0
    if how == "sqrt":
        return math.sqrt(mean_rank / k)
    if how == "linear":
        return mean_rank / k
    raise ValueError(f"unknown output reweighting {how!r}; expected one of {OUTPUT_REWEIGHTS}")


def output_scale(pool: GramPool, Ca: np.ndarray, Cb: np.ndarray, ranks: Sequence[int], weights: Sequence[float],
                 how: str) -> float:
    """The output reweighting's factor of the merged update B' A' (A' = Ca A, B' = B Cbᵀ)."""
    if how.startswith("norm_"):
        want = norm_target(pool.GA, pool.GB, per_unit(ranks, weights), ranks, how)
        have = math.sqrt(update_norm_sq(pool.GA, pool.GB, Ca, Cb))
        return want / have if have > 0 else 0.0
    return output_factor(sum(ranks) / len(ranks), Ca.shape[0], how)


@dataclass
class PoolJob:
    """One module for ``lego_coefficients``: its pool (canonicalised as the options say: see ``lego_pool``),
    the inputs' ranks and weights, k, a function that draws uniforms in [0, 1) of a shape (the module's own
    random stream), and ``eps``, the float epsilon of the dtype the Gram products were multiplied in."""

    pool: GramPool
    ranks: Sequence[int]
    weights: Sequence[float]
    k: int
    draw: Callable[[tuple[int, ...]], np.ndarray]
    eps: float


def lego_pool(GA: np.ndarray, GB: np.ndarray, sign: np.ndarray, ranks: Sequence[int], scales: Sequence[float],
              weights: Sequence[float], unit_split: str = "b", canonicalize: str = "direction") -> GramPool:
    """The pool lego clusters: "direction" is "balance" here (its unit lengths are set in ``lego_coefficients``)."""
    if canonicalize not in LEGO_CANONICALIZATIONS:
        raise ValueError(f"unknown canonicalisation {canonicalize!r}; expected one of {LEGO_CANONICALIZATIONS}")
    sa, sb = unit_scales(ranks, scales, weights, unit_split)
    return pool_from_grams(GA, GB, sign, sa, sb, "balance" if canonicalize == "direction" else canonicalize)


def lego_coefficients(jobs: Sequence[PoolJob], *, param_reweight: str = "joint", output_reweight: str = "norm_geo",
                      canonicalize: str = "direction", n_init: int = 10, max_iter: int = 100
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per module, (Ca, Cb) (k_formed x P, float64): k-means of the pool's points ("direction": its units at
    unit length), centroids as the means of the points (with param_reweight "none", of the units), their
    lengths set by param_reweight, and the update scaled by output_reweight. Modules of equal pool size, k
    and eps are clustered in one batch (a k-means call's cost is mostly fixed); each module's result is
    the one it gets alone."""
    if param_reweight not in PARAM_REWEIGHTS:
        raise ValueError(f"unknown parameter reweighting {param_reweight!r}; expected one of {PARAM_REWEIGHTS}")
    if output_reweight not in OUTPUT_REWEIGHTS:
        raise ValueError(f"unknown output reweighting {output_reweight!r}; expected one of {OUTPUT_REWEIGHTS}")
    points = [direction_scales(j.pool) if canonicalize == "direction" else (j.pool.sa, j.pool.sb) for j in jobs]
    clusters = cluster_pools([j.pool.gram(*pt) for j, pt in zip(jobs, points)], jobs, n_init, max_iter)
    out = []
    for job, (ca, cb), (M, labels) in zip(jobs, points, clusters):
        ma, mb = (ca, cb) if param_reweight != "none" else (job.pool.sa, job.pool.sb)
        Ca, Cb = M * ma, M * mb
        fa, fb = member_rescale(job.pool, Ca, Cb, labels, param_reweight)
        Ca, Cb = Ca * fa[:, None], Cb * fb[:, None]
        out.append((Ca, Cb * output_scale(job.pool, Ca, Cb, job.ranks, job.weights, output_reweight)))
    return out


def cluster_pools(grams: Sequence[np.ndarray], jobs: Sequence[PoolJob], n_init: int, max_iter: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-means of the points behind each Gram matrix, those of one size, k and eps in one batch: per module
    the membership-mean matrix M (k_formed x P, 1/|cluster| on each member, so centroid j is Σ_i M_ji x_i)
    and the labels. With k >= P every point is its own cluster (no draws)."""
    if any(j.k < 1 for j in jobs):
        raise ValueError("k must be >= 1")
    groups: dict[tuple, list[int]] = {}
    for i, (G, job) in enumerate(zip(grams, jobs)):
        groups.setdefault((G.shape[0], job.k, job.eps), []).append(i)
    out: list = [None] * len(grams)
    for (n, k, eps), idx in groups.items():
        if k >= n:
            for i in idx:
                out[i] = (np.eye(n), np.arange(n))
            continue
        u = np.stack([jobs[i].draw(draws_shape(k, n_init)) for i in idx])
        results = cluster_grams(np.stack([grams[i] for i in idx]), k, u, COINCIDE_EPS * eps, max_iter)
        for i, (w, labels, _) in zip(idx, results):
            out[i] = (w, labels)
    return out


def centroid_products(Ca: np.ndarray, Cb: np.ndarray, A: np.ndarray, B: np.ndarray,
                      out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A' = Ca A (k x d_in) and B' = B Cbᵀ (d_out x k) in A's and B's dtype, from the stacked raw factors
    A (P x d_in) and B (d_out x P); one numpy product each, so that the library and the CLI's prefetch
    workers (the same arrays, the same call) form the same bits. ``out``: where to write them."""
    a, b = out if out is not None else (None, None)
    return np.matmul(Ca.astype(A.dtype), A, out=a), np.matmul(B, Cb.T.astype(B.dtype), out=b)
