"""lego: LoRA-LEGO (Zhao et al., ICLR 2025). Pool every input's rank units, cluster them with k-means
into k clusters, make the centroids the merged LoRA of rank k, and apply the dual reweighting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapter import Factors
from ..kmeans import kmeans_gram
from ..lowrank import output_rank
from ..msu import CANONICALIZATIONS, UNIT_SPLITS, GramPool, StackedGrams, gram_pool, per_unit, stacked_grams
from . import MergeMethod, ModuleJob, Option, register

PARAM_REWEIGHTS = ("joint", "halves", "sum", "none")
OUTPUT_REWEIGHTS = ("sqrt", "linear", "none", "norm_mean", "norm_rms", "norm_sum", "norm_gain", "norm_geo")
# "direction" is not a canonicalisation of the pool (it changes units' lengths): it clusters the
# balanced units' directions, and the centroids then take their magnitude from param_reweight
LEGO_CANONICALIZATIONS = CANONICALIZATIONS + ("direction",)


def member_rescale(pool: GramPool, Ca: torch.Tensor, Cb: torch.Tensor, labels: torch.Tensor,
                   how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Against norm decay (averaging unit vectors that point apart shrinks them): the factors (fa, fb) by
    which to multiply each centroid's a and b halves so that it has the mean norm of its members, as one
    vector ("joint") or each half on its own ("halves"); "sum" instead gives each centroid's rank-1 update
    |ā| |b̄| the summed update magnitude Σ |a_i| |b_i| of its members (both halves scaled alike): a cluster
    of m units carries m units' worth. Centroid j's halves are Σ_i Ca_ji a_i and Σ_i Cb_ji b_i, so their
    norms come from the Grams: |ā_j|² = (Ca G_A Caᵀ)_jj. A centroid of norm 0 gets factor 0."""
    k = Ca.shape[0]
    ones = torch.ones(k, dtype=torch.float64)
    if how == "none":
        return ones, ones
    if how not in PARAM_REWEIGHTS:
        raise ValueError(f"unknown parameter reweighting {how!r}; expected one of {PARAM_REWEIGHTS}")
    na, nb = pool.half_norms()  # the members' |a_i|, |b_i| (of the pooled units, not directions)
    have_a2 = ((Ca @ pool.GA) * Ca).sum(1).clamp_min(0)
    have_b2 = ((Cb @ pool.GB) * Cb).sum(1).clamp_min(0)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(torch.float64)

    def per_cluster(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(k, dtype=torch.float64).index_add_(0, labels, values)

    def ratio(want: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
        return torch.where(have > 0, want / torch.where(have > 0, have, ones), 0.0)

    if how == "sum":
        f = ratio(per_cluster(na * nb), have_a2.sqrt() * have_b2.sqrt()).sqrt()
        return f, f
    if how == "joint":
        f = ratio(per_cluster((na * na + nb * nb).sqrt()) / counts, (have_a2 + have_b2).sqrt())
        return f, f
    return ratio(per_cluster(na) / counts, have_a2.sqrt()), ratio(per_cluster(nb) / counts, have_b2.sqrt())


def update_norm_sq(GA: torch.Tensor, GB: torch.Tensor, Ca: torch.Tensor, Cb: torch.Tensor) -> float:
    """||B' A'||_F² for A' = Ca A and B' = B Cbᵀ: the sum of (B'ᵀB') ∘ (A'A'ᵀ), both k x k, from the Grams."""
    return max(float(((Cb @ GB @ Cb.T) * (Ca @ GA @ Ca.T)).sum()), 0.0)


def norm_target(GA: torch.Tensor, GB: torch.Tensor, unit_weights: torch.Tensor, ranks: list[int], how: str) -> float:
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
    products = torch.outer(unit_weights, unit_weights) * GB * GA
    edges = [0]
    for r in ranks:
        edges.append(edges[-1] + r)
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


def target_norm(factors: list[Factors], weights: list[float], how: str) -> float:
    """``norm_target`` of the inputs themselves (their Grams multiplied in their own dtype)."""
    st = stacked_grams(factors)
    return norm_target(st.GA, st.GB, per_unit(factors, weights), [f.rank for f in factors], how)


def output_factor(mean_rank: float, k: int, how: str) -> float:
    """Against variance expansion: the merged update is multiplied by sqrt(r/k) ("sqrt"), r/k ("linear")
    or 1 ("none"), r the mean input rank of the module, k the clusters formed. (The "norm_*" choices
    are handled in ``lego``: they need the inputs.)"""
    if how == "none" or how.startswith("norm_"):
        return 1.0
    if how == "sqrt":
        return math.sqrt(mean_rank / k)
    if how == "linear":
        return mean_rank / k
    raise ValueError(f"unknown output reweighting {how!r}; expected one of {OUTPUT_REWEIGHTS}")


def direction_scales(pool: GramPool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalings that make every unit of unit length (zero units stay zero): the points "direction" clusters."""
    na, nb = pool.half_norms()
    norm = (na * na + nb * nb).sqrt()
    norm = torch.where(norm > 0, norm, 1.0)
    return pool.sa / norm, pool.sb / norm


def lego(
    factors: list[Factors],
    weights: list[float],
    rank: int | None = None,
    *,
    generator: torch.Generator,
    prepared: StackedGrams | None = None,
    **options,
) -> Factors:
    """One module; see ``lego_many``. ``prepared``: ``stacked_grams(factors)``, the factors stacked and
    their Grams (the driver computes them in its reader thread)."""
    return lego_many([ModuleJob(factors, weights, generator, prepared)], rank, **options)[0]


def lego_many(
    jobs: list[ModuleJob],
    rank: int | None = None,
    *,
    param_reweight: str = "joint",
    output_reweight: str = "norm_geo",
    unit_split: str = "b",
    canonicalize: str = "direction",
    n_init: int = 10,
    max_iter: int = 100,
    finish_later: bool = False,
    **_,
) -> list[Factors] | list[Centroids]:
    """Every step on the P x P Grams of the pool (see ``msu.GramPool``): the units and the points clustered
    are scalings of the raw factors' rows, a centroid is a combination of them (k x P coefficients Ca, Cb),
    and the centroids' and inputs' norms come from the Grams; the k merged factors are formed once, at the
    end, from the raw factors. Modules of equal pool size and k are clustered in one ``kmeans_gram`` call
    (its per-call cost is mostly fixed); each module's result is the one it gets alone. ``finish_later``:
    return each module's ``Centroids`` instead, for ``form_centroids`` to turn into the factors (the merge
    driver queues that in its reader thread, and the main thread takes it back when the reader is behind:
    it reads every byte of the raw factors, the costliest step left once the Grams are made)."""
    pools, points = [], []
    for job in jobs:
        pool = gram_pool(job.factors, job.weights, unit_split,
                         "balance" if canonicalize == "direction" else canonicalize, stacked=job.prepared)
        # "direction" clusters the balanced units' unit-length directions
        pools.append(pool)
        points.append(direction_scales(pool) if canonicalize == "direction" else (pool.sa, pool.sb))
    ks = [output_rank(job.factors, rank) for job in jobs]
    clusters = cluster_all([pool.gram(*pt) for pool, pt in zip(pools, points)], ks, [job.generator for job in jobs],
                           [pool.A.dtype for pool in pools], n_init, max_iter)
    out = []
    for job, pool, (ca, cb), (M, labels) in zip(jobs, pools, points, clusters):
        # centroids average the points clustered, their length then set by param_reweight; with "direction"
        # and param_reweight=none, the plain mean of the members' units (direction only groups them)
        ma, mb = (ca, cb) if param_reweight != "none" else (pool.sa, pool.sb)
        Ca, Cb = M * ma, M * mb
        fa, fb = member_rescale(pool, Ca, Cb, labels, param_reweight)
        Ca, Cb = Ca * fa[:, None], Cb * fb[:, None]
        centroids = Centroids(pool, Ca, Cb * output_scale(pool, Ca, Cb, job, output_reweight))
        out.append(centroids if finish_later else form_centroids(centroids))
    return out


def cluster_all(grams: list[torch.Tensor], ks: list[int], generators: list[torch.Generator],
                precisions: list[torch.dtype], n_init: int, max_iter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k-means of the points behind each Gram matrix, those of one size, k and precision in one batch: per
    module the membership-mean matrix M (k_formed x P, 1/|cluster| on each member, so centroid j is
    Σ_i M_ji x_i) and the labels."""
    groups: dict[tuple, list[int]] = {}
    for i, (G, k, p) in enumerate(zip(grams, ks, precisions)):
        groups.setdefault((G.shape[0], k, p), []).append(i)
    out: list = [None] * len(grams)
    for (_, k, precision), idx in groups.items():
        results = kmeans_gram(torch.stack([grams[i] for i in idx]), k, generators=[generators[i] for i in idx],
                              n_init=n_init, max_iter=max_iter, precision=precision)
        for i, res in zip(idx, results):
            out[i] = (res.weights, res.labels)
    return out


def output_scale(pool: GramPool, Ca: torch.Tensor, Cb: torch.Tensor, job: ModuleJob, how: str) -> float:
    """The output reweighting's factor of the merged update B' A' (A' = Ca A, B' = B Cbᵀ)."""
    factors, weights = job.factors, job.weights
    if how.startswith("norm_"):
        want = norm_target(pool.GA, pool.GB, per_unit(factors, weights), [f.rank for f in factors], how)
        have = math.sqrt(update_norm_sq(pool.GA, pool.GB, Ca, Cb))
        return want / have if have > 0 else 0.0
    return output_factor(sum(f.rank for f in factors) / len(factors), Ca.shape[0], how)


@dataclass
class Centroids:
    """A module's merged factors before they are formed: A' = Ca A and B' = B Cbᵀ from the pool's raw factors."""

    pool: GramPool
    Ca: torch.Tensor
    Cb: torch.Tensor


def form_centroids(c: Centroids) -> Factors:
    return centroid_factors(c.pool, c.Ca, c.Cb)


def centroid_factors(pool: GramPool, Ca: torch.Tensor, Cb: torch.Tensor) -> Factors:
    """The merged factors A' = Ca A (k x d_in) and B' = B Cbᵀ (d_out x k), from the raw stacked factors."""
    A, B = pool.A, pool.B
    return Factors(Ca.to(A.device, A.dtype) @ A, B @ Cb.T.to(B.device, B.dtype))


register(MergeMethod(
    name="lego",
    summary="LoRA-LEGO: k-means over the pooled rank units, centroids as the merged LoRA (default)",
    fn=lego,
    fn_many=lego_many,
    prepare=stacked_grams,
    prepare_takes_grams=True,
    finish=form_centroids,
    options=(
        Option("param_reweight", str, "joint", "rescale each centroid to the mean norm of its members: as one "
               "vector (joint), each half separately (halves); give its update the summed update norm of its members (sum); "
               "or not at all (none)",
               PARAM_REWEIGHTS),
        Option("output_reweight", str, "norm_geo", "multiply the merged update by sqrt(r/k) (sqrt), r/k (linear) "
               "or 1 (none), r = mean input rank of the module, k = clusters formed; or scale it to the "
               "Frobenius norm of the inputs' weighted mean (norm_mean), of their sum (norm_sum), or to the "
               "root mean square of the inputs' own norms (norm_rms), to rms² / ||mean|| (norm_gain: rms for "
               "identical inputs, up to rms·sqrt(N) for orthogonal ones), or to sqrt(rms · norm_gain) (norm_geo)",
               OUTPUT_REWEIGHTS),
        Option("unit_split", str, "b", "where scale and weight go in a unit: all on b (b), or the square "
               "root on each half with the sign on b (sqrt)", UNIT_SPLITS),
        Option("canonicalize", str, "direction", "before clustering: none; sign (a unit and its negation "
               "coincide); balance (sign, then |a| = |b|); direction (balance, then cluster unit-length "
               "directions, lengths restored by param_reweight)", LEGO_CANONICALIZATIONS),
        Option("n_init", int, 10, "k-means restarts; the lowest inertia is kept"),
        Option("max_iter", int, 100, "k-means iterations per restart at most"),
    ),
    default_weight="one",
    description="Every rank unit [a_i; b_i] of every input is pooled; k-means (k-means++ init, restarts) "
                "forms k clusters; centroid j gives row j of A and column j of B; then parameter and "
                "output reweighting.",
))
