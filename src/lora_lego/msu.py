"""Minimal Semantic Units: rank i of a LoRA is the pair (row i of A, column i of B).

A module's units are held as two matrices with one row per unit, ``Ua`` (r x d_in) and ``Ub``
(r x d_out), so that ΔW = Ub.T @ Ua = Σ_i b_i a_iᵀ. Permuting rows permutes units and leaves ΔW
unchanged; stacking the rows of several LoRAs sums their ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import Factors
from .kmeans import gram_matrix
from .lego_core import CANONICALIZATIONS, UNIT_SPLITS, GramPool, pool_from_grams, unit_scales
from .lowrank import stack_factors



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


# -- the same pool in Gram space: see lego_core.py ------------------------------------------------------


@dataclass
class StackedGrams:
    """The inputs' factors stacked without weights (lego keeps those as scalings), A = [A_1; ...; A_N] and
    B = [B_1, ..., B_N], and their Grams A Aᵀ and Bᵀ B as float64 on the CPU."""

    A: torch.Tensor
    B: torch.Tensor
    GA: torch.Tensor
    GB: torch.Tensor
    sign: torch.Tensor | None = None  # sign_of_largest(A), float64 on the CPU


def stacked_grams(factors: list[Factors], known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> StackedGrams:
    """Stack the factors and multiply their Grams in the factors' dtype and device (the costly part of
    lego: P² (d_in + d_out)); the rest of the work is on these P x P matrices, small, on the CPU. Also the
    sign of each row of A's largest entry (for the sign canonicalisation; cheap, and off the merging thread
    when this runs as the method's prepare step). ``known``: (G_A, G_B, sign) of these very factors, already
    computed bit for bit as here (the CLI's Gram prefetch, ``prefetch.py``): only stacked then."""
    stacked = stack_factors(factors, [1.0] * len(factors))
    A, B = stacked.A, stacked.B
    if known is not None:
        return StackedGrams(A, B, *known)
    return StackedGrams(A, B, gram64(A), gram64(B.T), sign_of_largest(A))


def gram64(X: torch.Tensor) -> torch.Tensor:
    """X Xᵀ, multiplied in X's dtype, returned as float64 on the CPU. A float32 or float64 X on the CPU goes
    to numpy's BLAS, which sees the product of a matrix with its own transpose (syrk: half the products);
    a 128 x 11008 float32 X took 2.0 ms against 3.2-3.7 ms with torch's gemm (one thread, AMD EPYC, MKL),
    and the reader thread of the 8 x Llama-7B merge 0.35 CPU-seconds less. numpy's BLAS runs on one thread
    whatever torch's setting (lora_lego sets OPENBLAS_NUM_THREADS=1 unless the user chose), so the result
    does not depend on the thread count."""
    if X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
        x = X.numpy()
        return torch.from_numpy(x @ x.T).to(torch.float64)
    return gram_matrix(X).to("cpu", torch.float64)


def sign_of_largest(A: torch.Tensor) -> torch.Tensor:
    """The sign (+1 for 0) of each row's largest-magnitude entry, the first one where several tie, as
    ``canonicalize_units`` takes it; float64 on the CPU."""
    # max and min, not |A|.argmax (a copy of A) nor aminmax (25x slower along rows in torch 2.13 on the CPU)
    lo, hi = A.amin(dim=1), A.amax(dim=1)
    sign = torch.where(hi >= -lo, 1.0, -1.0).to("cpu", torch.float64)
    tied = ((hi == -lo) & (hi != 0)).cpu()  # +m and -m both present: the first one decides
    if tied.any():
        rows = A[tied.to(A.device)]
        first = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))[:, 0]
        sign[tied] = torch.where(first < 0, -1.0, 1.0).to("cpu", torch.float64)
    return sign


def gram_pool(factors: list[Factors], weights: list[float], split: str = "b", canonicalize: str = "none",
              stacked: StackedGrams | None = None) -> GramPool:
    """The pool of ``pool_units`` in Gram space (lego_core.GramPool, with the stacked raw factors as A and B):
    the same units (to the rounding of the Gram products), with the canonicalisation applied as scalings.
    ``stacked``: ``stacked_grams(factors)`` if already made."""
    if canonicalize not in CANONICALIZATIONS:
        raise ValueError(f"unknown canonicalisation {canonicalize!r}; expected one of {CANONICALIZATIONS}")
    st = stacked if stacked is not None else stacked_grams(factors)
    sign = st.sign if st.sign is not None or canonicalize == "none" else sign_of_largest(st.A)
    sa, sb = unit_scales([f.rank for f in factors], [f.scale for f in factors], weights, split)
    pool = pool_from_grams(st.GA.numpy(), st.GB.numpy(), None if sign is None else sign.numpy(), sa, sb, canonicalize)
    pool.A, pool.B = st.A, st.B
    return pool
