"""task_arithmetic: the best rank-k approximation of Σ λ_i ΔW_i, task vectors added with weights λ_i
(1 each by default). The computation is linear's; only the default weights differ."""

from __future__ import annotations

from . import MergeMethod, register
from .linear import linear

register(MergeMethod(
    name="task_arithmetic",
    summary="best rank-k approximation of the sum of the updates times lambda (1 each by default)",
    fn=linear,
    default_weight="one",
    description="ΔW = truncated SVD of Σ λ_i ΔW_i at rank k, λ_i given by --weights (1 each by default); "
                "the same computation as linear with other default weights.",
))
