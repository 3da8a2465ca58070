"""lego: LoRA-LEGO (Zhao et al., ICLR 2025). Pool every input's rank units, cluster them with k-means
into k clusters, make the centroids the merged LoRA of rank k, and apply the dual reweighting."""

from __future__ import annotations

import math

import torch

from ..adapter import Factors
from ..kmeans import kmeans
from ..msu import CANONICALIZATIONS, UNIT_SPLITS, factors_from_units, pool_units
from . import MergeMethod, Option, register

PARAM_REWEIGHTS = ("joint", "halves", "none")
OUTPUT_REWEIGHTS = ("sqrt", "linear", "none")


def parameter_reweight(centers: torch.Tensor, X: torch.Tensor, labels: torch.Tensor, d_in: int, how: str) -> torch.Tensor:
    """Against norm decay (averaging unit vectors that point apart shrinks them): rescale each centroid
    to the mean norm of its members, as one vector ("joint") or each half on its own ("halves")."""
    if how == "none":
        return centers
    k = centers.shape[0]
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(X.dtype)

    def rescale(C: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, labels, P.norm(dim=1)) / counts
        norm = C.norm(dim=1)
        factor = torch.where(norm > 0, target / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
        return C * factor[:, None]

    if how == "joint":
        return rescale(centers, X)
    if how == "halves":
        return torch.cat([rescale(centers[:, :d_in], X[:, :d_in]), rescale(centers[:, d_in:], X[:, d_in:])], dim=1)
    raise ValueError(f"unknown parameter reweighting {how!r}; expected one of {PARAM_REWEIGHTS}")


def output_factor(mean_rank: float, k: int, how: str) -> float:
    """Against variance expansion: the merged update is multiplied by sqrt(r/k) ("sqrt"), r/k ("linear")
    or 1 ("none"), r the mean input rank of the module, k the clusters formed."""
    if how == "none":
        return 1.0
    if how == "sqrt":
        return math.sqrt(mean_rank / k)
    if how == "linear":
        return mean_rank / k
    raise ValueError(f"unknown output reweighting {how!r}; expected one of {OUTPUT_REWEIGHTS}")


def lego(
    factors: list[Factors],
    weights: list[float],
    rank: int | None = None,
    *,
    generator: torch.Generator,
    param_reweight: str = "joint",
    output_reweight: str = "sqrt",
    unit_split: str = "b",
    canonicalize: str = "none",
    n_init: int = 10,
    max_iter: int = 100,
    **_,
) -> Factors:
    k = rank if rank is not None else max(f.rank for f in factors)
    X, d_in = pool_units(factors, weights, unit_split, canonicalize)
    result = kmeans(X, k, generator=generator, n_init=n_init, max_iter=max_iter)
    centers = parameter_reweight(result.centers, X, result.labels, d_in, param_reweight)
    merged = factors_from_units(centers, d_in)
    mean_rank = sum(f.rank for f in factors) / len(factors)
    merged.B = merged.B * output_factor(mean_rank, centers.shape[0], output_reweight)
    return merged


register(MergeMethod(
    name="lego",
    summary="LoRA-LEGO: k-means over the pooled rank units, centroids as the merged LoRA (default)",
    fn=lego,
    options=(
        Option("param_reweight", str, "joint", "rescale each centroid to the mean norm of its members: as one "
               "vector (joint), each half separately (halves), or not at all (none)", PARAM_REWEIGHTS),
        Option("output_reweight", str, "sqrt", "multiply the merged update by sqrt(r/k) (sqrt), r/k (linear) "
               "or 1 (none); r = mean input rank of the module, k = clusters formed", OUTPUT_REWEIGHTS),
        Option("unit_split", str, "b", "where scale and weight go in a unit: all on b (b), or the square "
               "root on each half with the sign on b (sqrt)", UNIT_SPLITS),
        Option("canonicalize", str, "none", "before clustering: none; sign (a unit and its negation "
               "coincide); balance (sign, then |a| = |b|)", CANONICALIZATIONS),
        Option("n_init", int, 10, "k-means restarts; the lowest inertia is kept"),
        Option("max_iter", int, 100, "k-means iterations per restart at most"),
    ),
    default_weight="one",
    description="Every rank unit [a_i; b_i] of every input is pooled; k-means (k-means++ init, restarts) "
                "forms k clusters; centroid j gives row j of A and column j of B; then parameter and "
                "output reweighting.",
))
