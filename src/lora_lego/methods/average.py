"""average: the paper's weight averaging in factor space. The trained halves of equal-rank LoRAs are averaged
separately, A = Σ w_i √s_i A_i and B = Σ w_i √s_i B_i, and the merged update is their product B A."""

from __future__ import annotations

import math

from ..adapter import Factors
from ..lowrank import truncate_factors
from . import MergeMethod, register


def average(factors: list[Factors], weights: list[float], rank: int | None = None, **_) -> Factors:
    A = 0
    B = 0
    for f, w in zip(factors, weights):
        # unfold the scale s (B holds s B_i) and put √s on each half
        root = math.sqrt(abs(f.scale))
        A = A + (w * root) * f.A
        B = B + (w / root if root > 0 else w) * f.B
    merged = Factors(A, B)
    if rank is not None and rank < merged.rank:
        return truncate_factors(merged.A, merged.B, rank)
    return merged


register(MergeMethod(
    name="average",
    summary="average the A's and the B's separately (weight averaging), needs equal ranks",
    fn=average,
    equal_ranks=True,
    default_weight="mean",
    description="A = Σ w_i √s_i A_i, B = Σ w_i √s_i B_i, ΔW = B A, s_i the adapter's scale. Inputs must "
                "share their rank per module. The weight applies to both halves, so a negative weight does "
                "not negate an update. --rank below the input rank truncates B A optimally.",
))
