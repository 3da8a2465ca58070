"""magnitude_prune: keep each update's largest-magnitude entries, take the weighted sum, then the best
rank-k approximation (PEFT's merge_utils.magnitude_prune, then an SVD)."""

from __future__ import annotations

import torch

from ..adapter import Factors
from ..elementwise import magnitude_trim, task_deltas, weighted_sum
from ..lowrank import truncate_merged
from . import MergeMethod, register
from .ties import DENSITY


def magnitude_prune_delta(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    # map: one update at a time, none kept once it is added
    return weighted_sum(map(lambda d: magnitude_trim(d, density), deltas), weights)


def magnitude_prune(factors: list[Factors], weights: list[float], rank: int | None = None, *,
                    density: float = 0.2, **_) -> Factors:
    return truncate_merged(magnitude_prune_delta(task_deltas(factors), weights, density), factors, rank)


register(MergeMethod(
    name="magnitude_prune",
    summary="keep each update's top entries by magnitude, weighted sum, then rank k by SVD",
    fn=magnitude_prune,
    options=(DENSITY,),
    default_weight="mean",
    description="Per module in float32: keep each ΔW_i's top --density entries by magnitude, Σ w_i, then "
                "the truncated SVD at rank k.",
))
