"""ties: TIES-Merging (Yadav et al., 2023) of each module's dense updates, as PEFT's merge_utils.ties, then
the best rank-k approximation of the result."""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapter import Factors
from ..elementwise import SIGN_METHODS, Masked, apply_trim, sign_consensus, task_deltas, trim_mask
from ..lowrank import truncate_merged
from . import MergeMethod, Option, fraction, register

DENSITY = Option("density", float, 0.2, "share of each update's entries kept, in (0, 1]", valid=fraction,
                 valid_text="in (0, 1]")
MAJORITY_SIGN = Option("majority_sign", str, "total", "sign election per entry: sign of the summed trimmed "
                       "updates (total) or of the count of positive minus negative entries (frequency)",
                       SIGN_METHODS)


def ties_delta(deltas: Sequence[torch.Tensor], weights: list[float], density: float, majority_sign: str) -> torch.Tensor:
    """Trim each update to its int(density x n) largest-magnitude entries, elect a sign per entry, and take
    the mean of the agreeing weighted entries. One update at a time: the trim masks are kept as bits
    between the two passes (``Masked``)."""
    trimmed = Masked(deltas, lambda d: trim_mask(d, density), apply_trim)
    return sign_consensus(trimmed, weights, majority_sign)


def ties(factors: list[Factors], weights: list[float], rank: int | None = None, *, density: float = 0.2,
         majority_sign: str = "total", **_) -> Factors:
    return truncate_merged(ties_delta(task_deltas(factors), weights, density, majority_sign), factors, rank)


register(MergeMethod(
    name="ties",
    summary="TIES-Merging: trim, elect sign, disjoint mean of the dense updates, then rank k by SVD",
    fn=ties,
    options=(DENSITY, MAJORITY_SIGN),
    default_weight="one",
    description="Per module in float32: keep each ΔW_i's top --density entries by magnitude, elect each "
                "entry's sign, average the agreeing entries of the w_i ΔW_i, then the truncated SVD at "
                "rank k.",
))
