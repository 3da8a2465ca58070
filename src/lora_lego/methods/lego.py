"""lego: LoRA-LEGO (Zhao et al., ICLR 2025). Pool every input's rank units, cluster them with k-means
into k clusters, make the centroids the merged LoRA of rank k, and apply the dual reweighting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..adapter import Factors
from ..lego_core import (LEGO_CANONICALIZATIONS, LEGO_DEFAULTS, OUTPUT_REWEIGHTS, PARAM_REWEIGHTS, UNIT_SPLITS, GramPool,
                         PoolJob, centroid_products, lego_coefficients, lego_pool, norm_target, per_unit)
from ..lowrank import output_rank
from ..msu import StackedGrams, sign_of_largest, stacked_grams
from . import MergeMethod, ModuleJob, Option, register


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
    pool_jobs = []
    for job in jobs:
        st = job.prepared if job.prepared is not None else stacked_grams(job.factors)
        ranks = [f.rank for f in job.factors]
        sign = st.sign if st.sign is not None else sign_of_largest(st.A)
        pool = lego_pool(st.GA.numpy(), st.GB.numpy(), sign.numpy(), ranks, [f.scale for f in job.factors],
                         job.weights, unit_split, canonicalize)
        pool.A, pool.B = st.A, st.B
        pool_jobs.append(PoolJob(pool, ranks, job.weights, output_rank(job.factors, rank), _uniforms(job.generator),
                                 torch.finfo(st.A.dtype).eps))
    coefficients = lego_coefficients(pool_jobs, param_reweight=param_reweight, output_reweight=output_reweight,
                                     canonicalize=canonicalize, n_init=n_init, max_iter=max_iter)
    out = []
    for pj, (Ca, Cb) in zip(pool_jobs, coefficients):
        centroids = Centroids(pj.pool, Ca, Cb)
        out.append(centroids if finish_later else form_centroids(centroids))
    return out


def _uniforms(generator: torch.Generator):
    """The module's draws for k-means: from its own generator, float64 (the CLI's prefetch workers draw the
    same numbers from the seed with torch_random, before torch is imported)."""
    return lambda shape: torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu().numpy()


def target_norm(factors: list[Factors], weights: list[float], how: str) -> float:
    """``norm_target`` of the inputs themselves (their Grams multiplied in their own dtype)."""
    st = stacked_grams(factors)
    ranks = [f.rank for f in factors]
    return norm_target(st.GA, st.GB, per_unit(ranks, weights), ranks, how)


@dataclass
class Centroids:
    """A module's merged factors before they are formed: A' = Ca A and B' = B Cbᵀ from the pool's raw factors."""

    pool: GramPool
    Ca: np.ndarray  # k x P, float64
    Cb: np.ndarray


def form_centroids(c: Centroids) -> Factors:
    return centroid_factors(c.pool, c.Ca, c.Cb)


def centroid_factors(pool: GramPool, Ca: np.ndarray, Cb: np.ndarray) -> Factors:
    """The merged factors A' = Ca A (k x d_in) and B' = B Cbᵀ (d_out x k), from the raw stacked factors: on
    the CPU with numpy's product, as the CLI's prefetch workers form them (lego_core.centroid_products)."""
    A, B = pool.A, pool.B
    if A.device.type == "cpu" and B.device.type == "cpu":
        a, b = centroid_products(Ca, Cb, A.numpy(), B.numpy())
        return Factors(torch.from_numpy(a), torch.from_numpy(b))
    Ca, Cb = torch.from_numpy(Ca), torch.from_numpy(Cb)
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
        Option("param_reweight", str, LEGO_DEFAULTS["param_reweight"], "rescale each centroid to the mean norm of its members: as one "
               "vector (joint), each half separately (halves); give its update the summed update norm of its members (sum); "
               "or not at all (none)",
               PARAM_REWEIGHTS),
        Option("output_reweight", str, LEGO_DEFAULTS["output_reweight"], "multiply the merged update by sqrt(r/k) (sqrt), r/k (linear) "
               "or 1 (none), r = mean input rank of the module, k = clusters formed; or scale it to the "
               "Frobenius norm of the inputs' weighted mean (norm_mean), of their sum (norm_sum), or to the "
               "root mean square of the inputs' own norms (norm_rms), to rms² / ||mean|| (norm_gain: rms for "
               "identical inputs, up to rms·sqrt(N) for orthogonal ones), or to sqrt(rms · norm_gain) (norm_geo)",
               OUTPUT_REWEIGHTS),
        Option("unit_split", str, LEGO_DEFAULTS["unit_split"], "where scale and weight go in a unit: all on b (b), or the square "
               "root on each half with the sign on b (sqrt)", UNIT_SPLITS),
        Option("canonicalize", str, LEGO_DEFAULTS["canonicalize"], "before clustering: none; sign (a unit and its negation "
               "coincide); balance (sign, then |a| = |b|); direction (balance, then cluster unit-length "
               "directions, lengths restored by param_reweight)", LEGO_CANONICALIZATIONS),
        Option("n_init", int, LEGO_DEFAULTS["n_init"], "k-means restarts; the lowest inertia is kept"),
        Option("max_iter", int, LEGO_DEFAULTS["max_iter"], "k-means iterations per restart at most"),
    ),
    default_weight="one",
    description="Every rank unit [a_i; b_i] of every input is pooled; k-means (k-means++ init, restarts) "
                "forms k clusters; centroid j gives row j of A and column j of B; then parameter and "
                "output reweighting.",
))
