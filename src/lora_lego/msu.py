"""Minimal Semantic Units: rank i of a LoRA is the pair (row i of A, column i of B).

A module's units are held as two matrices with one row per unit, ``Ua`` (r x d_in) and ``Ub``
(r x d_out), so that ΔW = Ub.T @ Ua = Σ_i b_i a_iᵀ. Permuting rows permutes units and leaves ΔW
unchanged; stacking the rows of several LoRAs sums their ΔW.
"""

from __future__ import annotations

import math

import torch

from .adapter import Factors

UNIT_SPLITS = ("b", "sqrt")
CANONICALIZATIONS = ("none", "sign", "balance")


def units_from_factors(f: Factors, weight: float = 1.0, split: str = "b") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (Ua, Ub) for one input, with its weight applied so that Ub.T @ Ua = weight * ΔW.

    ``split`` says where the scale s and weight w go: "b" puts both on b (a stays the trained row of
    lora_A); "sqrt" puts sqrt(|w s|) on each half and the sign on b, treating a and b alike."""
    if split == "b":
        return f.A, (f.B * weight).T
    if split == "sqrt":
        s = f.scale if f.scale != 0 else 1.0
        c = weight * s
        root = math.sqrt(abs(c))
        sign = 1.0 if c >= 0 else -1.0
        return f.A * root, (f.B / s * (sign * root)).T
    raise ValueError(f"unknown unit split {split!r}; expected one of {UNIT_SPLITS}")


def canonicalize_units(Ua: torch.Tensor, Ub: torch.Tensor, how: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Map each unit to a representative of its class of rank-1 updates, so that units which give the
    same b aᵀ coincide before clustering. Every option leaves each unit's b aᵀ unchanged.

    "sign": flip (a, b) to (-a, -b) so that a's largest-magnitude entry is positive.
    "balance": "sign", then rescale to |a| = |b| = sqrt(|a| |b|)."""
    if how == "none":
        return Ua, Ub
    if how not in CANONICALIZATIONS:
        raise ValueError(f"unknown canonicalisation {how!r}; expected one of {CANONICALIZATIONS}")
    idx = Ua.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(Ua.gather(1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Ua, Ub = Ua * sign, Ub * sign
    if how == "balance":
        na = Ua.norm(dim=1, keepdim=True)
        nb = Ub.norm(dim=1, keepdim=True)
        ok = (na > 0) & (nb > 0)
        ratio = torch.where(ok, (nb / torch.where(ok, na, torch.ones_like(na))).sqrt(), torch.ones_like(na))
        Ua, Ub = Ua * ratio, Ub / ratio
    return Ua, Ub


def pool_units(factors: list[Factors], weights: list[float], split: str = "b",
               canonicalize: str = "none") -> tuple[torch.Tensor, int]:
    """Stack every input's units into one pool X (n x (d_in + d_out)), each row [a_i ; b_i]. Returns X and
    d_in, where the halves split."""
    d_in = factors[0].A.shape[1]
    dtype = factors[0].A.dtype
    for f in factors:
        dtype = torch.promote_types(torch.promote_types(dtype, f.A.dtype), f.B.dtype)
    X = torch.empty(sum(f.rank for f in factors), d_in + factors[0].B.shape[0], dtype=dtype, device=factors[0].A.device)
    row = 0
    for f, w in zip(factors, weights):
        if split == "b" and canonicalize == "none":
            # the common case, written straight into X: no weighted copy of B, the same values
            X[row:row + f.rank, :d_in] = f.A
            torch.mul(f.B.T, w, out=X[row:row + f.rank, d_in:])
            row += f.rank
            continue
        Ua, Ub = canonicalize_units(*units_from_factors(f, w, split), canonicalize)
        X[row:row + f.rank, :d_in] = Ua  # copied straight into place: one pass, no intermediate pools
        X[row:row + f.rank, d_in:] = Ub
        row += f.rank
    return X, d_in


def factors_from_units(X: torch.Tensor, d_in: int) -> Factors:
    """Reassemble: row i of X gives row i of A and column i of B."""
    return Factors(X[:, :d_in].contiguous(), X[:, d_in:].T.contiguous())
