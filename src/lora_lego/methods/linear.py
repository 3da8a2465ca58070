"""linear: the best rank-k approximation of the weighted mean Σ w_i ΔW_i (w_i = 1/N by default), computed
from the stacked factors without forming ΔW."""

from __future__ import annotations

import torch

from typing import Any

from ..adapter import Factors
from ..lowrank import join, output_rank, stack_b, truncate_factors
from . import MergeMethod, register


def stacked_a_qr(factors: list[Factors]) -> tuple[Any, Any]:
    """The stacked A and the Householder QR of its transpose (``torch.geqrf``): the half of linear's work that
    does not depend on the weights, which the merge driver runs in its reader thread (the two QRs were
    most of linear's time)."""
    A = join([f.A for f in factors], dim=0)
    return A, torch.geqrf(A.T)


def linear(factors: list[Factors], weights: list[float], rank: int | None = None, *,
           prepared: tuple[Any, Any] | None = None, **_) -> Factors:
    """``prepared``: ``stacked_a_qr(factors)``, if already made."""
    A, qr_a = prepared if prepared is not None else stacked_a_qr(factors)
    return truncate_factors(A, stack_b(factors, weights), output_rank(factors, rank), qr_a=qr_a)


register(MergeMethod(
    name="linear",
    summary="best rank-k approximation of the weighted mean of the updates (exact SVD from factors)",
    fn=linear,
    prepare=stacked_a_qr,
    default_weight="mean",
    description="ΔW = truncated SVD of Σ w_i ΔW_i at rank k, computed by QR of the stacked B and of the "
                "stacked Aᵀ and an SVD of the small core; the dense ΔW is never formed. Equals PEFT's "
                "add_weighted_adapter(combination_type='svd').",
))
