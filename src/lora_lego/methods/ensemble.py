"""ensemble: the exact mean of the updates, (1/N) Σ ΔW_i, at rank Σ r_i (the paper's output ensemble)."""

from __future__ import annotations

from . import MergeMethod, register
from .concat import concat

# concat itself, registered with weights 1/N by default
register(MergeMethod(
    name="ensemble",
    summary="exact mean of the updates (output ensemble), rank = sum of input ranks",
    fn=concat,
    takes_rank=False,
    default_weight="mean",
    description="concat with weights 1/N by default: ΔW = (1/N) Σ ΔW_i exactly, which equals averaging the "
                "outputs of the N adapted layers. The output rank is Σ r_i; --rank is refused.",
))
