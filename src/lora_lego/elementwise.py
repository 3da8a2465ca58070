"""Elementwise operations on the dense task updates ΔW_i of one module, for TIES, DARE and magnitude
pruning. They follow PEFT's ``peft.utils.merge_utils`` (0.21.2) step for step, so that the same inputs
(and, for DARE, the same random stream) give the same merged update."""

from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")


def task_deltas(factors, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """ΔW_i = B_i A_i (scale folded in), dense, in float32."""
    return [(f.B.to(dtype) @ f.A.to(dtype)) for f in factors]


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density x n) entries of largest magnitude, zero the rest (density >= 1 keeps all)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[keep] = 1
    return delta * mask.reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by ``density``, so that
    the expectation is unchanged. density >= 1 keeps all and draws nothing."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=w)
    return out


def elect_sign(deltas: list[torch.Tensor], how: str) -> torch.Tensor:
    """The elected sign per entry (+1 on ties): that of the summed (unweighted) updates ("total") or of the
    count of positive minus negative entries ("frequency")."""
    if how not in SIGN_METHODS:
        raise ValueError(f"unknown sign election {how!r}; expected one of {SIGN_METHODS}")
    mass = torch.zeros_like(deltas[0])
    for d in deltas:  # accumulated, not stacked: one extra module-sized tensor, not N
        mass.add_(d if how == "total" else d.sign())
    return torch.where(mass >= 0, 1.0, -1.0).to(deltas[0].dtype)


def disjoint_mean(deltas: list[torch.Tensor], weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the weighted entries whose (unweighted) sign agrees with the elected sign;
    entries that were zeroed never agree, and an entry no input agrees on is 0."""
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        agree = (d.sign() == sign).to(d.dtype)
        total.add_(d * agree, alpha=w)
        count.add_(agree)
    return total / count.clamp_min(1.0)


def sign_consensus(deltas: list[torch.Tensor], weights: list[float], how: str) -> torch.Tensor:
    """TIES' last two steps: elect a sign, then the disjoint mean of the agreeing weighted entries."""
    return disjoint_mean(deltas, weights, elect_sign(deltas, how))
