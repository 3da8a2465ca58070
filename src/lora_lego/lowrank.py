"""Rank-k truncation: the best rank-k approximation (Eckart-Young) of a low-rank sum, computed from its
factors without forming the dense update, and of a dense update (by verified subspace iteration or the
full SVD).

Both return factors in one canonical form: A = V_kᵀ (orthonormal rows) and B = U_k S_k, so that
B @ A = U_k S_k V_kᵀ, the truncated SVD, as PEFT's ``svd`` merge and kohya's SVD merge store it.
"""

from __future__ import annotations

import torch

from .adapter import Factors


def output_rank(factors: list[Factors], rank: int | None) -> int:
    """The rank asked for, or by default the largest input rank of the module."""
    return rank if rank is not None else max(f.rank for f in factors)


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int,
                     qr_a: tuple[torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """Best rank-``rank`` approximation of B @ A, with A (R x d_in) and B (d_out x R) stacked factors.

    B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR), so B A = Q_b (R_b R_aᵀ) Q_aᵀ; the small core R_b R_aᵀ
    (at most R x R) is decomposed as U S Vᵀ, and (Q_b U, S, Q_a V) is the SVD of B A. Cost
    O((d_out + d_in) R² + R³), memory O((d_out + d_in) R): the d_out x d_in update is never formed.
    The output rank is ``rank``, or fewer where B A has fewer singular values (R, d_out or d_in).
    ``qr_a``: ``torch.geqrf(A.T)`` if already made (linear's prepare step, in the merge's reader thread).
    """
    dtype = A.dtype
    # Householder QR without forming Q (geqrf): Q is applied to the k kept columns only (ormqr). Forming
    # Q (orgqr) cost as much as the factorisation: 14.6 ms against 7.7 ms for an 11008 x 128 one on one
    # thread, and the QRs were 4.2 of linear's 5 CPU-seconds on the 8 x Llama-7B set.
    hb, tau_b = torch.geqrf(B)
    ha, tau_a = qr_a if qr_a is not None else torch.geqrf(A.T)
    Rb, Ra = hb[:min(B.shape)].triu(), ha[:min(A.shape)].triu()
    # the core is small; float64 keeps its singular vectors accurate where singular values are close
    U, S, Vh = torch.linalg.svd(Rb.double() @ Ra.double().T, full_matrices=False)
    k = min(rank, S.numel())
    new_B = apply_q(hb, tau_b, (U[:, :k] * S[:k]).to(dtype))
    new_A = apply_q(ha, tau_a, Vh[:k].T.to(dtype)).T.contiguous()
    return Factors(new_A, new_B)


def apply_q(reflectors: torch.Tensor, tau: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Q X for the reduced Q (m x p, p = len(tau)) of a QR that ``torch.geqrf`` gave, X (p x k): the full Q
    applied (ormqr) to X padded with zero rows, so that Q is never formed."""
    padded = torch.zeros(reflectors.shape[0], X.shape[1], dtype=X.dtype, device=X.device)
    padded[:X.shape[0]] = X
    return torch.ormqr(reflectors, tau, padded)


def stack_factors(factors: list[Factors], weights: list[float]) -> Factors:
    """Stack the units of every input: A = [A_1; ...; A_N], B = [w_1 B_1, ..., w_N B_N], so that
    B @ A = Σ w_i B_i A_i exactly."""
    return Factors(join([f.A for f in factors], dim=0), stack_b(factors, weights))


def stack_b(factors: list[Factors], weights: list[float]) -> torch.Tensor:
    """B = [w_1 B_1, ..., w_N B_N], the B half of ``stack_factors``."""
    return join([f.B * w if w != 1.0 else f.B for f, w in zip(factors, weights)], dim=1)  # no copy to multiply by 1


def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)``; where the parts already lie one after the other along ``dim`` in one tensor
    (the merge driver reads a module's inputs into one stacked A and B), that tensor itself, not a copy."""
    first = parts[0]
    others = lambda t: [n for d, n in enumerate(t.shape) if d != dim]  # noqa: E731
    offset = first.storage_offset()
    for t in parts:
        if (t.device != first.device or t.dtype != first.dtype or t.stride() != first.stride()
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset or others(t) != others(first)):
            return torch.cat(parts, dim=dim)
        offset += t.shape[dim] * t.stride(dim)
    size = list(first.shape)
    size[dim] = sum(t.shape[dim] for t in parts)
    return first.as_strided(size, first.stride(), first.storage_offset())


def truncate_sum(factors: list[Factors], weights: list[float], rank: int) -> Factors:
    """Best rank-``rank`` approximation of Σ w_i B_i A_i, from the stacked factors."""
    stacked = stack_factors(factors, weights)
    return truncate_factors(stacked.A, stacked.B, rank)


def truncate_dense(delta: torch.Tensor, rank: int, signal_rank: int = 0) -> Factors:
    """Best rank-``rank`` approximation of a dense update, in the input's dtype; used by the elementwise
    methods, whose merged update is no longer low-rank.

    Where the kept rank is small against the matrix, the top singular triplets come from block subspace
    iteration, accepted only once each kept triplet is exact to float32 rounding (see
    ``subspace_truncate``): on a 4096 x 4096 update that took about a second against 41 to 46 s for a
    full SVD on one CPU thread. Otherwise, or if it does not converge, the full SVD
    (O(d_out d_in min(d_out, d_in))). ``signal_rank``: the rank of the update's dominant part where it is
    known (Σ r_i for a sparsified sum of LoRA updates); the block spans it, so that the iteration
    converges at the rate of the drop after it."""
    k = min(rank, *delta.shape)
    block = max(k, signal_rank) + max(k, 16)
    if 4 * block <= min(delta.shape):
        out = subspace_truncate(delta, k, block)
        if out is not None:
            return out
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Factors(Vh[:k].contiguous(), U[:, :k] * S[:k])


def truncate_merged(delta: torch.Tensor, factors: list[Factors], rank: int | None) -> Factors:
    """T_k of a dense update merged from ``factors``: k = ``rank``, or by default their largest rank; the
    dominant part of such an update has rank up to Σ r_i."""
    return truncate_dense(delta, output_rank(factors, rank), signal_rank=sum(f.rank for f in factors))


# 50 float32 epsilons: a few times the residual that rounding leaves on 4096 to 11008-wide updates
SUBSPACE_TOL = 50 * torch.finfo(torch.float32).eps


def subspace_truncate(M: torch.Tensor, k: int, block: int, *, tol: float = SUBSPACE_TOL,
                      max_iter: int = 30) -> Factors | None:
    """The top-``k`` SVD of M by block subspace iteration with ``block`` >= k columns (the extra ones
    speed convergence), or None if it has not converged after ``max_iter`` iterations.

    Each iteration gives Ritz triplets (u_i, σ_i, v_i) with Mᵀ u_i = σ_i v_i exactly; they are accepted
    when every kept one also has |M v_i - σ_i u_i| <= tol σ_1, which bounds how far each σ_i is from a
    singular value of M and each pair from its singular vectors. The start is a fixed random block, so
    the result is deterministic on a device."""
    gen = torch.Generator(device=M.device).manual_seed(0)
    start = torch.randn(M.shape[1], block, generator=gen, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ start).Q
    for _ in range(max_iter):
        Qz, Rz = torch.linalg.qr(M.T @ Q)  # Qᵀ M = Rzᵀ Qzᵀ
        Ur, S, Vrh = torch.linalg.svd(Rz.T.double())  # Rzᵀ = Ur S Vrh: u = Q Ur, v = Qz Vrhᵀ
        U = Q @ Ur[:, :k].to(M.dtype)
        Vr = Vrh[:k].T.to(M.dtype)
        Sk = S[:k].to(M.dtype)
        Y = M @ Qz
        residual = (Y @ Vr - U * Sk).norm(dim=0)
        if residual.max() <= tol * S[0]:
            return Factors((Qz @ Vr).T.contiguous(), U * Sk)
        Q = torch.linalg.qr(Y).Q
    return None
