"""k-means from the Gram matrix of the points: the data on any torch device, the clustering on n x n arrays.

Every step of k-means needs only inner products between points: a centre is a mean of points, so
|x_i - c_j|^2 = G_ii - 2 (w_j G)_i + w_j G w_jᵀ, with G = X Xᵀ (n x n) and w_j the row of membership
weights (1/|cluster| on its members). One Gram matrix per module, computed once from the data, makes every
later iteration cost O(n^2 k) instead of O(n k d): with LoRA units n = N r is a few hundred while
d = d_in + d_out is tens of thousands. The centres themselves are formed once, at the end, as W X.

The products X Xᵀ and W X run where X is (``--device``); the clustering in between touches only n x n
matrices, so it runs on the CPU in float64 with numpy, whose small operations cost microseconds where
a torch call costs tens (a few hundred of them per module).

Greedy k-means++ initialisation, several restarts keeping the lowest inertia, empty clusters re-seeded
with the point farthest from its centre. Restarts run side by side as one batch, and ``kmeans_gram``
takes a batch of Gram matrices (several modules of equal pool size) with one generator each; the random
numbers of a module come from its own generator only, so a module's result does not depend on what else
is in the batch. The same inputs and generator seeds give bit-identical results on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .kmeans_core import COINCIDE_EPS, cluster_grams, draws_shape


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (k_formed x d)
    labels: torch.Tensor  # (n,) int64, cluster of each point
    inertia: float  # sum of squared distances to the assigned centre


@dataclass
class GramKMeansResult:
    """A clustering found from the Gram matrix: centre j is ``weights[j] @ X``."""

    weights: torch.Tensor  # (k_formed x n), row j: 1/|cluster| on the members its centre averages
    labels: torch.Tensor  # (n,) int64
    inertia: float


def gram_matrix(X: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """G = X Xᵀ, the inner products between the rows of X. With the rows in ``blocks`` groups only the
    blocks on and above the diagonal are multiplied, the others mirrored (G is symmetric): with 4 groups
    10/16 of the work of X @ X.T, the dominant cost of lego."""
    n = X.shape[0]
    if n < 16 * blocks:
        return X @ X.T
    edges = [n * i // blocks for i in range(blocks + 1)]
    parts = [X[edges[i]:edges[i + 1]] for i in range(blocks)]
    G = torch.empty(n, n, dtype=X.dtype, device=X.device)
    for i in range(blocks):
        for j in range(i, blocks):
            block = parts[i] @ parts[j].T
            G[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = block
            if j != i:
                G[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = block.T
    return G


def kmeans_gram(G: torch.Tensor, k: int, *, generators: Sequence[torch.Generator], n_init: int = 10,
                max_iter: int = 100, tol: float = 1e-10, precision: torch.dtype | None = None) -> list[GramKMeansResult]:
    """Cluster the points behind a batch of Gram matrices G (m x n x n, or one n x n matrix) into at most
    k clusters each, with generator ``generators[i]`` for matrix i. Fewer than k clusters are formed only
    when there are fewer than k distinct points; with k >= n every point is its own cluster.

    ``tol`` is relative to the mean squared norm of the points: a restart stops when its labels repeat
    or its centres move by at most that much in total. ``precision``: the dtype the Gram entries were
    multiplied in (default G's own), whose round-off decides when two points coincide; a float64 G
    combined from float32 products passes float32."""
    if G.dim() == 2:
        G = G[None]
    m, n, _ = G.shape
    if len(generators) != m:
        raise ValueError(f"{m} Gram matrices but {len(generators)} generators")
    if k < 1:
        raise ValueError("k must be >= 1")
    if k >= n:
        eye = torch.eye(n, dtype=G.dtype, device=G.device)
        return [GramKMeansResult(eye, torch.arange(n, device=G.device), 0.0) for _ in range(m)]
    u = torch.stack([torch.rand(draws_shape(k, n_init), generator=g, device=g.device, dtype=torch.float64)
                     for g in generators])
    # the clustering itself works on n x n matrices, on the CPU in float64 (kmeans_core), on any device's Gram
    eps = COINCIDE_EPS * torch.finfo(precision or G.dtype).eps
    results = cluster_grams(G.detach().to("cpu", torch.float64).numpy(), k, u.cpu().numpy(), eps, max_iter, tol)
    return [GramKMeansResult(torch.from_numpy(w).to(G.device, G.dtype), torch.from_numpy(lab).to(G.device), inertia)
            for w, lab, inertia in results]


def kmeans(X: torch.Tensor, k: int, *, generator: torch.Generator, n_init: int = 10, max_iter: int = 100,
           tol: float = 1e-10) -> KMeansResult:
    """Cluster the rows of X into at most k clusters. With k >= n every point is its own cluster. Fewer
    than k clusters are formed only when X has fewer than k distinct rows."""
    n = X.shape[0]
    if k < 1:
        raise ValueError("k must be >= 1")
    if k >= n:
        return KMeansResult(X.clone(), torch.arange(n, device=X.device), 0.0)
    res = kmeans_gram(gram_matrix(X), k, generators=[generator], n_init=n_init, max_iter=max_iter, tol=tol)[0]
    return KMeansResult(res.weights @ X, res.labels, res.inertia)
