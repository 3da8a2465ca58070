"""concat: the exact weighted sum Σ w_i ΔW_i, at rank Σ r_i, by stacking units."""

from __future__ import annotations

from ..adapter import Factors
from ..lowrank import stack_factors as concat_factors
from . import MergeMethod, register


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
