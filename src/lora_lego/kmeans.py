"""k-means in torch, on any device, from the Gram matrix of the points.

Every step of k-means needs only inner products between points: a centre is a mean of points, so
|x_i - c_j|^2 = G_ii - 2 (w_j G)_i + w_j G w_jᵀ, with G = X Xᵀ (n x n) and w_j the row of membership
weights (1/|cluster| on its members). One Gram matrix per module, computed once from the data, makes every
later iteration cost O(n^2 k) instead of O(n k d): with LoRA units n = N r is a few hundred while
d = d_in + d_out is tens of thousands. The centres themselves are formed once, at the end, as W X.

Greedy k-means++ initialisation, several restarts keeping the lowest inertia, empty clusters re-seeded
with the point farthest from its centre. Restarts run side by side as one batch, and ``kmeans_gram``
takes a batch of Gram matrices (several modules of equal pool size) with one generator each; the random
numbers of a module come from its own generator only, so a module's result does not depend on what else
is in the batch. The same inputs and generator seeds give bit-identical results on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


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


# Distances below this many float epsilons of |x_i|^2 + |x_j|^2 are round-off of the Gram formula: the
# points coincide. Exact duplicates then count as one point, as they would with exact differences.
_COINCIDE_EPS = 64


def gram_matrix(X: torch.Tensor) -> torch.Tensor:
    """G = X Xᵀ, the inner products between the rows of X."""
    return X @ X.T


def _zero_round_off(d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Clamp squared distances at 0 and set those within round-off of ``scale`` (|x|^2 + |c|^2) to 0."""
    eps = _COINCIDE_EPS * torch.finfo(d.dtype).eps
    return d.masked_fill_(d <= eps * scale, 0.0)


def _plus_plus(G: torch.Tensor, diag: torch.Tensor, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ for a batch: G (m x n x n), diag (m x n), u (m x R x k x t) uniforms in [0, 1)
    for R restarts, t local trials. Returns the chosen point indices (m x R x k) and which of them are
    real centres (m x R x k): once every point coincides with a chosen one, no further centre is taken
    (fewer distinct points than k), and those slots stay inactive."""
    m, R, _, t = u.shape
    n = diag.shape[1]
    rows = torch.arange(m, device=G.device)[:, None]  # (m x 1): module of each batch element
    chosen = torch.zeros(m, R, k, dtype=torch.long, device=G.device)
    active = torch.zeros(m, R, k, dtype=torch.bool, device=G.device)
    first = (u[:, :, 0, 0] * n).long().clamp_max(n - 1)  # (m x R)
    chosen[:, :, 0] = first
    active[:, :, 0] = True

    # every pairwise squared distance at once (m x n x n): the loop below then only indexes rows
    scale = diag[:, :, None] + diag[:, None, :]
    D = _zero_round_off((scale - 2.0 * G).clamp_min_(0.0), scale)

    def dist_to(idx: torch.Tensor) -> torch.Tensor:  # idx (m x R x t) -> (m x R x t x n)
        return D[rows[:, :, None], idx]

    closest = dist_to(first[:, :, None])[:, :, 0]  # (m x R x n)
    for s in range(1, k):
        cum = closest.double().cumsum(-1)
        total = cum[..., -1]
        live = total > 0  # (m x R)
        if not bool(live.any()):
            break
        # inverse-CDF sampling of t candidates with probability proportional to `closest`; the target
        # stays below the total so that it lands on a point with positive weight
        target = torch.minimum(u[:, :, s, :].double() * total[..., None], torch.nextafter(total, torch.zeros_like(total))[..., None])
        cand = torch.searchsorted(cum, target, right=True).clamp_max_(n - 1)  # (m x R x t)
        new_closest = torch.minimum(closest[:, :, None, :], dist_to(cand))  # (m x R x t x n)
        best = new_closest.sum(-1).argmin(-1)  # (m x R): the candidate that lowers the potential most
        chosen[:, :, s] = cand.gather(-1, best[..., None])[..., 0]
        active[:, :, s] = live
        picked = new_closest.gather(2, best[:, :, None, None].expand(m, R, 1, n))[:, :, 0]
        closest = torch.where(live[..., None], picked, closest)
    return chosen, active


def _assign(G: torch.Tensor, diag: torch.Tensor, W: torch.Tensor, active: torch.Tensor):
    """Squared distances of every point to every centre (m x R x k x n), from the membership weights W
    (m x R x k x n); inactive centres are at +inf. Also returns the products S = W G."""
    m, R, k, n = W.shape
    S = torch.bmm(W.reshape(m, R * k, n), G).reshape(m, R, k, n)  # S[j, i] = c_j . x_i
    cc = (S * W).sum(-1)  # |c_j|^2
    scale = diag[:, None, None, :] + cc[..., None]
    d = _zero_round_off((scale - 2.0 * S).clamp_min_(0.0), scale)
    return d.masked_fill_(~active[..., None], math.inf), S, cc


def _memberships(labels: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership weights (... x k x n), 1/|cluster| on each member, and the cluster sizes (... x k)."""
    onehot = torch.nn.functional.one_hot(labels, k).transpose(-1, -2).to(dtype)
    counts = onehot.sum(-1)
    return onehot / counts.clamp_min(1)[..., None], counts


def _reseed_empty(min_d: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, empty: list[int]) -> None:
    """Give each empty cluster (in order) the point farthest from its centre among those whose cluster
    keeps at least one member; modifies ``labels`` and ``counts`` of one restart in place."""
    order = min_d.argsort(descending=True, stable=True).tolist()
    lab = labels.tolist()
    cnt = counts.long().tolist()
    taken = set()
    for j, idx in zip(empty, (i for i in order if cnt[lab[i]] > 1 and i not in taken)):
        taken.add(idx)
        cnt[lab[idx]] -= 1
        lab[idx] = j
        cnt[j] = 1
    labels.copy_(torch.tensor(lab, device=labels.device))


def _lloyd(G: torch.Tensor, diag: torch.Tensor, W: torch.Tensor, active: torch.Tensor, max_iter: int,
           tol: torch.Tensor):
    """Lloyd iterations for a batch of restarts, each frozen once its labels stop changing or its centres
    move by at most ``tol`` (m x 1). Returns the final membership weights, labels and inertia per restart."""
    m, R, k, n = W.shape
    labels = None
    done = torch.zeros(m, R, dtype=torch.bool, device=G.device)
    d, S, cc = _assign(G, diag, W, active)
    for _ in range(max_iter):
        min_d, new_labels = d.min(2)  # (m x R x n)
        W_new, counts = _memberships(new_labels, k, G.dtype)
        empty = active & (counts == 0) & ~done[..., None]
        if bool(empty.any()):
            for b in empty.any(-1).nonzero().tolist():
                i, r = b
                _reseed_empty(min_d[i, r], new_labels[i, r], counts[i, r], empty[i, r].nonzero().flatten().tolist())
            W_new, counts = _memberships(new_labels, k, G.dtype)
        d_new, S_new, cc_new = _assign(G, diag, W_new, active)
        # |c_new - c_old|^2 per centre, from products already at hand
        shift = (cc_new - 2.0 * (S_new * W).sum(-1) + cc).masked_fill_(~active, 0.0).clamp_min_(0.0).sum(-1)
        keep = done[..., None, None]
        W = torch.where(keep, W, W_new)
        d = torch.where(keep, d, d_new)
        S = torch.where(keep, S, S_new)
        cc = torch.where(done[..., None], cc, cc_new)
        same = torch.zeros_like(done) if labels is None else (labels == new_labels).all(-1)
        labels = new_labels if labels is None else torch.where(done[..., None], labels, new_labels)
        done = done | same | (shift <= tol)
        if bool(done.all()):
            break
    min_d, labels = d.min(2)
    return W, labels, min_d.sum(-1)


def kmeans_gram(G: torch.Tensor, k: int, *, generators: Sequence[torch.Generator], n_init: int = 10,
                max_iter: int = 100, tol: float = 1e-10) -> list[GramKMeansResult]:
    """Cluster the points behind a batch of Gram matrices G (m x n x n, or one n x n matrix) into at most
    k clusters each, with generator ``generators[i]`` for matrix i. Fewer than k clusters are formed only
    when there are fewer than k distinct points; with k >= n every point is its own cluster.

    ``tol`` is relative to the mean squared norm of the points: a restart stops when its labels repeat
    or its centres move by at most that much in total."""
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
    R = max(1, n_init)
    t = 2 + int(math.log(k))
    u = torch.stack([torch.rand(R, k, t, generator=g, device=G.device, dtype=torch.float64) for g in generators])
    diag = G.diagonal(dim1=1, dim2=2).contiguous()
    chosen, active = _plus_plus(G, diag, u, k)
    W0 = torch.nn.functional.one_hot(chosen, n).to(G.dtype)  # each centre starts on its chosen point
    scale = (diag.sum(1) / n).clamp_min(1e-30)
    W, labels, inertia = _lloyd(G, diag, W0, active, max_iter, (tol * scale)[:, None])
    best = inertia.argmin(1)  # the first restart of lowest inertia
    out = []
    for i in range(m):
        b = int(best[i])
        w, lab = W[i, b], labels[i, b]
        used = torch.bincount(lab, minlength=k) > 0
        if not bool(used.all()):
            # drop clusters left empty by the final assignment (and inactive ones) and renumber labels
            remap = torch.cumsum(used.long(), 0) - 1
            w, lab = w[used], remap[lab]
        out.append(GramKMeansResult(w, lab, float(inertia[i, b])))
    return out


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
