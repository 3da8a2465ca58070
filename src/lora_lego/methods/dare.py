"""dare_linear and dare_ties: DARE (Yu et al., 2024) of each module's dense updates, as PEFT's merge_utils:
drop entries at random with probability 1 - density, rescale the rest by 1/density, then a weighted sum
(dare_linear) or TIES' sign election and disjoint mean (dare_ties); then the best rank-k approximation."""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapter import Factors
from ..elementwise import Masked, apply_drop, drop_mask, random_drop, sign_consensus, task_deltas, weighted_sum
from ..lowrank import truncate_merged
from . import MergeMethod, register
from .ties import DENSITY, MAJORITY_SIGN


def dropped(deltas: Sequence[torch.Tensor], density: float, generator: torch.Generator) -> Masked:
    """The inputs' updates with DARE's random drop, drawn in input order from ``generator`` when first read;
    the drop masks are kept as bits, so a second read gives the same updates (``Masked``)."""
    return Masked(deltas, lambda d: drop_mask(d, density, generator), lambda d, m, inplace: apply_drop(d, m, density, inplace))


def dare_linear_delta(deltas, weights, density: float, generator: torch.Generator) -> torch.Tensor:
    # one pass: each update is dropped and added, then let go (draws in input order)
    return weighted_sum(map(lambda d: random_drop(d, density, generator), deltas), weights)


def dare_ties_delta(deltas, weights, density: float, majority_sign: str, generator: torch.Generator) -> torch.Tensor:
    return sign_consensus(dropped(deltas, density, generator), weights, majority_sign)


def dare_linear(factors: list[Factors], weights: list[float], rank: int | None = None, *,
                generator: torch.Generator, density: float = 0.2, **_) -> Factors:
    return truncate_merged(dare_linear_delta(task_deltas(factors), weights, density, generator), factors, rank)


def dare_ties(factors: list[Factors], weights: list[float], rank: int | None = None, *,
              generator: torch.Generator, density: float = 0.2, majority_sign: str = "total", **_) -> Factors:
    return truncate_merged(dare_ties_delta(task_deltas(factors), weights, density, majority_sign, generator),
                          factors, rank)


register(MergeMethod(
    name="dare_linear",
    summary="DARE: random drop and rescale of the dense updates, weighted sum, then rank k by SVD",
    fn=dare_linear,
    options=(DENSITY,),
    default_weight="mean",
    description="Per module in float32: each entry of each ΔW_i is kept with probability --density and "
                "divided by it (seeded by --seed and the module name), then Σ w_i, then the truncated SVD "
                "at rank k.",
))

register(MergeMethod(
    name="dare_ties",
    summary="DARE drop and rescale, then TIES sign election and disjoint mean, then rank k by SVD",
    fn=dare_ties,
    options=(DENSITY, MAJORITY_SIGN),
    default_weight="one",
    description="As dare_linear, but the dropped updates are combined by TIES' sign election and "
                "disjoint mean of the agreeing weighted entries.",
))
