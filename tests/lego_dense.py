"""The reference for lego: LoRA-LEGO on the dense pool of units, as lora_lego computed it before its
steps moved to the P x P Grams (commit a527925): the units' rows pooled and canonicalised, k-means on the
pool's Gram matrix, centroids as means of pooled rows, norms of the formed factors. lego must give the
same clustering and, to float32 rounding, the same factors."""

from __future__ import annotations

import math

import torch

from lora_lego.adapter import Factors
from lora_lego.kmeans import kmeans
from lora_lego.methods import get_method
from lora_lego.lego_core import PARAM_REWEIGHTS, norm_rule, output_factor
from lora_lego.msu import factors_from_units, pool_units


def parameter_reweight(centers: torch.Tensor, X: torch.Tensor, labels: torch.Tensor, d_in: int, how: str) -> torch.Tensor:
    """Against norm decay (averaging unit vectors that point apart shrinks them): rescale each centroid
    to the mean norm of its members, as one vector ("joint") or each half on its own ("halves"). "sum"
    instead gives each centroid's rank-1 update |ā| |b̄| the summed update magnitude Σ |a_i| |b_i| of its
    members (both halves scaled alike): a cluster of m units carries m units' worth."""
    if how == "none":
        return centers
    k = centers.shape[0]
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(X.dtype)
    if how == "sum":
        member = X[:, :d_in].norm(dim=1) * X[:, d_in:].norm(dim=1)
        target = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, labels, member)
        have = centers[:, :d_in].norm(dim=1) * centers[:, d_in:].norm(dim=1)
        factor = torch.where(have > 0, (target / torch.where(have > 0, have, torch.ones_like(have))).sqrt(), torch.zeros_like(have))
        return centers * factor[:, None]

    def rescale(C: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        target = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, labels, P.norm(dim=1)) / counts
        norm = C.norm(dim=1)
        factor = torch.where(norm > 0, target / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
        return C * factor[:, None]

    if how == "joint":
        return rescale(centers, X)
    if how == "halves":
        return torch.cat([rescale(centers[:, :d_in], X[:, :d_in]), rescale(centers[:, d_in:], X[:, d_in:])], dim=1)
    raise ValueError(f"unknown parameter reweighting {how!r}; expected one of {PARAM_REWEIGHTS}")


def update_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B A||_F without forming B A: sqrt(sum((BᵀB) ∘ (A Aᵀ))), in float64."""
    A64, B64 = A.double(), B.double()
    return math.sqrt(max(float(((B64.T @ B64) * (A64 @ A64.T)).sum()), 0.0))


def target_norm(factors: list[Factors], weights: list[float], how: str) -> float:
    """lego's norm targets (``norm_rule``) from the dense float64 updates w_j ΔW_j (small modules only)."""
    deltas = [w * (f.B.double() @ f.A.double()) for f, w in zip(factors, weights)]
    return norm_rule([float(d.norm()) ** 2 for d in deltas], float(sum(deltas).norm()) ** 2, how)


def lego_dense(factors: list[Factors], weights: list[float], rank: int | None = None, *,
               generator: torch.Generator, **options) -> Factors:
    opts = {**get_method("lego").option_defaults(), **options}  # lego's own defaults
    param_reweight, output_reweight = opts["param_reweight"], opts["output_reweight"]
    unit_split, canonicalize = opts["unit_split"], opts["canonicalize"]
    n_init, max_iter = opts["n_init"], opts["max_iter"]
    k = rank if rank is not None else max(f.rank for f in factors)
    if canonicalize == "direction":
        X, d_in = pool_units(factors, weights, unit_split, "balance")
        norms = X.norm(dim=1, keepdim=True)
        D = X / torch.where(norms > 0, norms, torch.ones_like(norms))
        result = kmeans(D, k, generator=generator, n_init=n_init, max_iter=max_iter)
        # the centroid of each cluster's directions, its length then set by param_reweight; with
        # param_reweight=none, the plain mean of the members' units (direction only groups them)
        counts = torch.bincount(result.labels, minlength=result.centers.shape[0]).clamp_min(1).to(D.dtype)
        members = X if param_reweight == "none" else D
        centers = torch.zeros_like(result.centers).index_add_(0, result.labels, members) / counts[:, None]
    else:
        X, d_in = pool_units(factors, weights, unit_split, canonicalize)
        result = kmeans(X, k, generator=generator, n_init=n_init, max_iter=max_iter)
        centers = result.centers
    centers = parameter_reweight(centers, X, result.labels, d_in, param_reweight)
    merged = factors_from_units(centers, d_in)
    if output_reweight.startswith("norm_"):
        have = update_norm(merged.A, merged.B)
        want = target_norm(factors, weights, output_reweight)
        merged.B = merged.B * (want / have if have > 0 else 0.0)
        return merged
    mean_rank = sum(f.rank for f in factors) / len(factors)
    merged.B = merged.B * output_factor(mean_rank, centers.shape[0], output_reweight)
    return merged
