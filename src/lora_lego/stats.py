"""What an adapter holds, module by module, and how far two adapters are apart: computed from the factors,
never forming ΔW (d_out x d_in) itself, in float64 so that a tiny difference is not lost to rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import Adapter, Factors


@dataclass
class ModuleStats:
    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scale: float
    norm: float  # Frobenius norm of ΔW
    effective_rank: float  # exp(entropy of the normalised singular values of ΔW), between 1 and rank


def singular_values(f: Factors) -> torch.Tensor:
    """The singular values of ΔW = B @ A from two thin QRs: B = Q_b R_b, Aᵀ = Q_a R_a, so ΔW has the singular
    values of the r x r matrix R_b R_aᵀ."""
    A, B = f.A.to(torch.float64), f.B.to(torch.float64)
    _, rb = torch.linalg.qr(B)
    _, ra = torch.linalg.qr(A.T)
    return torch.linalg.svdvals(rb @ ra.T)


def effective_rank(s: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank: exp of the Shannon entropy of s / sum(s); 0 for a zero update."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def module_stats(adapter: Adapter, name: str) -> ModuleStats:
    spec = adapter.modules[name]
    s = singular_values(adapter.factors(name))
    return ModuleStats(name, spec.kind, (spec.d_out, spec.d_in), spec.rank, spec.alpha, spec.scale,
                       float(s.norm()), effective_rank(s))


def frobenius(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B @ A‖_F from the r x r Gram matrices: ‖BA‖² = Σ (BᵀB) ∘ (A Aᵀ)."""
    A, B = A.to(torch.float64), B.to(torch.float64)
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def relative_error(x: Factors, y: Factors) -> tuple[float, float]:
    """(‖ΔW_y − ΔW_x‖ / ‖ΔW_x‖, cosine of ΔW_x and ΔW_y), from the stacked factors [B_x, −B_y] [A_x; A_y]."""
    nx, ny = frobenius(x.A, x.B), frobenius(y.A, y.B)
    diff = frobenius(torch.cat([x.A, y.A]), torch.cat([x.B, -y.B], dim=1))
    inner = float(((x.B.to(torch.float64).T @ y.B.to(torch.float64))
                   * (x.A.to(torch.float64) @ y.A.to(torch.float64).T)).sum())
    rel = diff / nx if nx > 0 else (0.0 if diff == 0 else math.inf)
    cos = inner / (nx * ny) if nx > 0 and ny > 0 else (1.0 if nx == ny == 0 else 0.0)
    return rel, cos
