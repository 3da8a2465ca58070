"""concat: the exact weighted sum Σ w_i ΔW_i, at rank Σ r_i, by stacking units."""

from __future__ import annotations

import torch

from ..adapter import Factors
from . import MergeMethod, register


def concat_factors(factors: list[Factors], weights: list[float]) -> Factors:
    """Stack the units of every input: A = [A_1; ...; A_N], B = [w_1 B_1, ..., w_N B_N], so that
    B @ A = Σ w_i B_i A_i exactly."""
    A = torch.cat([f.A for f in factors], dim=0)
    B = torch.cat([f.B * w for f, w in zip(factors, weights)], dim=1)
    return Factors(A, B)


def concat(factors: list[Factors], weights: list[float], rank: int | None = None, **_) -> Factors:
    return concat_factors(factors, weights)


register(MergeMethod(
    name="concat",
    summary="exact weighted sum of the updates, rank = sum of input ranks",
    fn=concat,
    takes_rank=False,
    default_weight="one",
    description="ΔW = Σ w_i ΔW_i exactly: A stacks the A_i, B stacks the w_i B_i. The output rank is "
                "Σ r_i; --rank is refused (use a truncating method such as lego).",
))
