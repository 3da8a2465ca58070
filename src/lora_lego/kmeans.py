"""k-means in torch, on any device: greedy k-means++ initialisation, several restarts keeping the lowest
inertia, empty clusters re-seeded, bit-identical results for a fixed generator seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (k_formed x d)
    labels: torch.Tensor  # (n,) int64, cluster of each point
    inertia: float  # sum of squared distances to the assigned centre


def _sq_dist(X: torch.Tensor, sq_norms: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared distances (n x k) by |x|^2 - 2 x.c + |c|^2, clamped at 0 against round-off."""
    d = sq_norms[:, None] - 2.0 * (X @ C.T) + (C * C).sum(1)[None, :]
    return d.clamp_min_(0.0)


def kmeans_plus_plus(X: torch.Tensor, k: int, generator: torch.Generator, n_local_trials: int | None = None) -> torch.Tensor:
    """Indices of up to k initial centres. Stops early when every remaining point coincides with a chosen
    centre (fewer distinct points than k): those clusters could only be empty."""
    n = X.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device).item())
    chosen = [first]
    # exact differences, so duplicates of a chosen point get distance exactly 0
    closest = ((X - X[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = closest.sum()
        if not total > 0:
            break
        cand = torch.multinomial(closest, n_local_trials, replacement=True, generator=generator)
        cand_d = torch.stack([((X - X[c]) ** 2).sum(1) for c in cand.tolist()])  # (t x n)
        new_closest = torch.minimum(closest[None, :], cand_d)
        best = int(new_closest.sum(1).argmin().item())
        chosen.append(int(cand[best].item()))
        closest = new_closest[best]
    return torch.tensor(chosen, device=X.device)


def _lloyd(X: torch.Tensor, sq_norms: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float):
    n, k = X.shape[0], centers.shape[0]
    labels = None
    for _ in range(max_iter):
        d = _sq_dist(X, sq_norms, centers)
        min_d, new_labels = d.min(1)
        counts = torch.bincount(new_labels, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            # re-seed each empty cluster with the point farthest from its centre
            order = min_d.argsort(descending=True).tolist()
            taken = set()
            for j, idx in zip(empty, (i for i in order if counts[new_labels[i]] > 1 and i not in taken)):
                taken.add(idx)
                counts[new_labels[idx]] -= 1
                new_labels[idx] = j
                counts[j] = 1
        sums = torch.zeros_like(centers).index_add_(0, new_labels, X)
        new_centers = sums / counts.clamp_min(1)[:, None].to(X.dtype)
        shift = ((new_centers - centers) ** 2).sum()
        centers = new_centers
        if labels is not None and torch.equal(labels, new_labels):
            break
        labels = new_labels
        if shift <= tol:
            break
    d = _sq_dist(X, sq_norms, centers)
    min_d, labels = d.min(1)
    return centers, labels, float(min_d.sum())


def kmeans(X: torch.Tensor, k: int, *, generator: torch.Generator, n_init: int = 10, max_iter: int = 100,
           tol: float = 1e-10) -> KMeansResult:
    """Cluster the rows of X into at most k clusters. With k >= n every point is its own cluster. Fewer
    than k clusters are formed only when X has fewer than k distinct rows."""
    n = X.shape[0]
    if k < 1:
        raise ValueError("k must be >= 1")
    if k >= n:
        return KMeansResult(X.clone(), torch.arange(n, device=X.device), 0.0)
    sq_norms = (X * X).sum(1)
    scale = float(sq_norms.sum()) / max(n, 1)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        init = kmeans_plus_plus(X, k, generator)
        centers, labels, inertia = _lloyd(X, sq_norms, X[init].clone(), max_iter, tol * max(scale, 1e-30))
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers, labels, inertia)
        if inertia == 0.0:
            break
    assert best is not None
    used = torch.bincount(best.labels, minlength=best.centers.shape[0]) > 0
    if not bool(used.all()):
        # drop clusters left empty by the final assignment and renumber labels
        remap = torch.cumsum(used.long(), 0) - 1
        best = KMeansResult(best.centers[used], remap[best.labels], best.inertia)
    return best
