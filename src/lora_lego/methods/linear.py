"""linear: the best rank-k approximation of the weighted mean Σ w_i ΔW_i (w_i = 1/N by default), computed
from the stacked factors without forming ΔW."""

from __future__ import annotations

from ..adapter import Factors
from ..lowrank import output_rank, truncate_sum
from . import MergeMethod, register


def linear(factors: list[Factors], weights: list[float], rank: int | None = None, **_) -> Factors:
    return truncate_sum(factors, weights, output_rank(factors, rank))


register(MergeMethod(
    name="linear",
    summary="best rank-k approximation of the weighted mean of the updates (exact SVD from factors)",
    fn=linear,
    default_weight="mean",
    description="ΔW = truncated SVD of Σ w_i ΔW_i at rank k, computed by QR of the stacked B and of the "
                "stacked Aᵀ and an SVD of the small core; the dense ΔW is never formed. Equals PEFT's "
                "add_weighted_adapter(combination_type='svd').",
))
