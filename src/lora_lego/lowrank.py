"""Rank-k truncation: the best rank-k approximation (Eckart-Young) of a low-rank sum, computed from its
factors without forming the dense update, and of a dense update by its SVD.

Both return factors in one canonical form: A = V_kᵀ (orthonormal rows) and B = U_k S_k, so that
B @ A = U_k S_k V_kᵀ, the truncated SVD, as PEFT's ``svd`` merge and kohya's SVD merge store it.
"""

from __future__ import annotations

import torch

from .adapter import Factors


def output_rank(factors: list[Factors], rank: int | None) -> int:
    """The rank asked for, or by default the largest input rank of the module."""
    return rank if rank is not None else max(f.rank for f in factors)


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of B @ A, with A (R x d_in) and B (d_out x R) stacked factors.

    B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR), so B A = Q_b (R_b R_aᵀ) Q_aᵀ; the small core R_b R_aᵀ
    (at most R x R) is decomposed as U S Vᵀ, and (Q_b U, S, Q_a V) is the SVD of B A. Cost
    O((d_out + d_in) R² + R³), memory O((d_out + d_in) R): the d_out x d_in update is never formed.
    The output rank is ``rank``, or fewer where B A has fewer singular values (R, d_out or d_in).
    """
    dtype = A.dtype
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    # the core is small; float64 keeps its singular vectors accurate where singular values are close
    U, S, Vh = torch.linalg.svd(Rb.double() @ Ra.double().T, full_matrices=False)
    k = min(rank, S.numel())
    new_B = Qb @ (U[:, :k] * S[:k]).to(dtype)
    new_A = Vh[:k].to(dtype) @ Qa.T
    return Factors(new_A, new_B)


def truncate_sum(factors: list[Factors], weights: list[float], rank: int) -> Factors:
    """Best rank-``rank`` approximation of Σ w_i B_i A_i, from the stacked factors."""
    A = torch.cat([f.A for f in factors], dim=0)
    B = torch.cat([f.B * w for f, w in zip(factors, weights)], dim=1)
    return truncate_factors(A, B, rank)


def truncate_dense(delta: torch.Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of a dense update by its full (exact) SVD, in the input's dtype.
    Cost O(d_out d_in min(d_out, d_in)); used by the elementwise methods, whose merged update is no
    longer low-rank."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    return Factors(Vh[:k].contiguous(), U[:, :k] * S[:k])
