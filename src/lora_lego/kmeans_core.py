"""k-means from the Gram matrix of the points, in numpy alone (float64, on the CPU).

Every step of k-means needs only inner products between points: a centre is a mean of points, so
|x_i - c_j|^2 = G_ii - 2 (w_j G)_i + w_j G w_jᵀ, with G = X Xᵀ (n x n) and w_j the row of membership
weights (1/|cluster| on its members). With LoRA units n = N r is a few hundred whatever the data's width,
so the clustering runs here, on n x n matrices, where small operations cost microseconds (a torch call
costs tens, and a few hundred of them run per module). Torch-free: the CLI's prefetch workers (prefetch.py)
run it before torch is imported; ``kmeans.py`` is the torch front end.

Greedy k-means++ initialisation, several restarts keeping the lowest inertia, empty clusters re-seeded
with the point farthest from its centre. Restarts run side by side as one batch, and ``cluster_grams``
takes a batch of Gram matrices (several modules of equal pool size) with the uniforms of each; a module's
result does not depend on what else is in the batch.
"""

from __future__ import annotations

import math

import numpy as np

# Distances below this many float epsilons (of the Gram matrix's dtype) of |x_i|^2 + |x_j|^2 are round-off
# of the Gram formula: the points coincide. Exact duplicates then count as one point, as they would with
# exact differences.
COINCIDE_EPS = 64
# Inputs with a value beyond this (times its weight) are refused before merging: far beyond any trained LoRA,
# and squared distances of such values still fit in float32.
MAX_ABS = 1e12


def _zero_round_off(d: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """Clamp squared distances at 0 and set those within round-off of ``scale`` (|x|^2 + |c|^2) to 0."""
    d = np.maximum(d, 0.0)
    return _zero_where_within(d, eps * scale)


def _zero_where_within(d: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """d[d <= bound] = 0, in place, as a product with the mask: a masked assignment is ~8x slower on such
    scattered masks (0.62 against 0.08 ms on 8 x 10 x 16 x 128), with the same values (d >= 0 here)."""
    return np.multiply(d, ~(d <= bound), out=d)


def _plus_plus(D: np.ndarray, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-means++ for a batch: D (m x n x n) pairwise squared distances, u (m x R x k x t) uniforms in
    [0, 1) for R restarts and t local trials. Returns the chosen point indices (m x R x k) and which of them
    are real centres: once every point coincides with a chosen one (fewer distinct points than k), no
    further centre is taken and the remaining slots stay inactive."""
    m, R, _, t = u.shape
    n = D.shape[1]
    mods = np.arange(m)[:, None, None]  # module of each batch element
    chosen = np.zeros((m, R, k), dtype=np.int64)
    active = np.zeros((m, R, k), dtype=bool)
    first = np.minimum((u[:, :, 0, 0] * n).astype(np.int64), n - 1)
    chosen[:, :, 0] = first
    active[:, :, 0] = True
    closest = D[mods[:, :, 0], first]  # (m x R x n)
    for s in range(1, k):
        cum = np.cumsum(closest, axis=-1)
        total = cum[..., -1]
        live = total > 0
        if not live.any():
            break
        # inverse-CDF sampling of t candidates with probability proportional to `closest`; the target stays
        # below the total so that it lands on a point of positive weight
        target = np.minimum(u[:, :, s, :] * total[..., None], np.nextafter(total, 0.0)[..., None])
        cand = np.minimum((cum[:, :, None, :] <= target[..., None]).sum(-1), n - 1)  # (m x R x t)
        new_closest = np.minimum(closest[:, :, None, :], D[mods, cand])  # (m x R x t x n)
        best = new_closest.sum(-1).argmin(-1)  # the candidate that lowers the potential most
        chosen[:, :, s] = np.take_along_axis(cand, best[..., None], -1)[..., 0]
        active[:, :, s] = live
        picked = np.take_along_axis(new_closest, best[..., None, None], 2)[:, :, 0]
        closest = np.where(live[..., None], picked, closest)
    return chosen, active


def _assign(G: np.ndarray, diag: np.ndarray, W: np.ndarray, active: np.ndarray, eps: float):
    """Squared distances of every point to every centre (m x R x k x n), from the membership weights W
    (m x R x k x n); inactive centres are at +inf. Also returns S = W G and |c_j|^2."""
    m, R, k, n = W.shape
    S = np.matmul(W.reshape(m, R * k, n), G).reshape(m, R, k, n)  # S[j, i] = c_j . x_i
    cc = (S * W).sum(-1)
    scale = diag[:, None, None, :] + cc[..., None]
    # _zero_round_off(scale - 2 S, scale, eps) in place: the same values with three fewer (m x R x k x n)
    # arrays allocated (k-means was half the merging thread's time on the 8 x Llama-7B set)
    d = np.multiply(S, -2.0)
    d += scale
    np.maximum(d, 0.0, out=d)
    scale *= eps
    _zero_where_within(d, scale)
    d[~active] = np.inf
    return d, S, cc


def _memberships(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Membership weights (... x k x n), 1/|cluster| on each member, and the cluster sizes (... x k)."""
    # (... x k x n) laid out as it is used (a transposed one-hot was copied again by every product with G)
    onehot = (labels[..., None, :] == np.arange(k)[:, None]).astype(np.float64)
    counts = onehot.sum(-1)
    return onehot / np.maximum(counts, 1)[..., None], counts


def _reseed_empty(min_d: np.ndarray, labels: np.ndarray, counts: np.ndarray, empty: list[int]) -> None:
    """Give each empty cluster (in order) the point farthest from its centre among those whose cluster
    keeps at least one member; modifies ``labels`` of one restart in place."""
    order = np.argsort(-min_d, kind="stable").tolist()
    cnt = counts.astype(np.int64).tolist()
    taken = set()
    for j, idx in zip(empty, (i for i in order if cnt[labels[i]] > 1 and i not in taken)):
        taken.add(idx)
        cnt[labels[idx]] -= 1
        labels[idx] = j
        cnt[j] = 1


def _lloyd(G: np.ndarray, diag: np.ndarray, W: np.ndarray, active: np.ndarray, max_iter: int, tol: np.ndarray,
           eps: float):
    """Lloyd iterations for a batch of restarts, each frozen once its labels stop changing or its centres
    move by at most ``tol`` (m x 1). Returns the final membership weights, labels and inertia per restart."""
    m, R, k, n = W.shape
    labels = None
    done = np.zeros((m, R), dtype=bool)
    d, S, cc = _assign(G, diag, W, active, eps)
    for _ in range(max_iter):
        new_labels = d.argmin(2)  # (m x R x n), the first of equally near centres
        W_new, counts = _memberships(new_labels, k)
        empty = active & (counts == 0) & ~done[..., None]
        if empty.any():
            min_d = d.min(2)
            for i, r in zip(*np.nonzero(empty.any(-1))):
                _reseed_empty(min_d[i, r], new_labels[i, r], counts[i, r], np.nonzero(empty[i, r])[0].tolist())
            W_new, counts = _memberships(new_labels, k)
        d_new, S_new, cc_new = _assign(G, diag, W_new, active, eps)
        # |c_new - c_old|^2 per centre, from products already at hand
        shift = np.where(active, cc_new - 2.0 * (S_new * W).sum(-1) + cc, 0.0).clip(min=0.0).sum(-1)
        keep = done[..., None, None]
        W = np.where(keep, W, W_new)
        d = np.where(keep, d, d_new)
        cc = np.where(done[..., None], cc, cc_new)
        same = np.zeros_like(done) if labels is None else (labels == new_labels).all(-1)
        labels = new_labels if labels is None else np.where(done[..., None], labels, new_labels)
        done = done | same | (shift <= tol)
        if done.all():
            break
    return W, d.argmin(2), d.min(2).sum(-1)


def draws_shape(k: int, n_init: int) -> tuple[int, int, int]:
    """The shape of the uniforms in [0, 1) one module's clustering consumes: restarts x k x local trials."""
    return max(1, n_init), k, 2 + int(math.log(k))


def cluster_grams(G: np.ndarray, k: int, u: np.ndarray, eps: float, max_iter: int = 100, tol: float = 1e-10
                  ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Cluster the points behind a batch of float64 Gram matrices G (m x n x n), k < n, with the uniforms u
    (m x ``draws_shape(k, n_init)``). Per matrix: the membership weights (k_formed x n, 1/|cluster| on each
    member), the labels (n, int64) and the inertia. ``eps``: distances within that many times |x|² + |y|²
    count as 0 (the round-off of the Gram products). ``tol`` is relative to the mean squared norm of the
    points: a restart stops when its labels repeat or its centres move by at most that much in total."""
    m, n, _ = G.shape
    diag = np.ascontiguousarray(np.diagonal(G, axis1=1, axis2=2))
    scale = diag[:, :, None] + diag[:, None, :]
    D = _zero_round_off(scale - 2.0 * G, scale, eps)  # every pairwise squared distance
    chosen, active = _plus_plus(D, u, k)
    W0 = np.eye(n)[chosen]  # each centre starts on its chosen point
    mean_sq = np.maximum(diag.sum(1) / n, 1e-30)
    W, labels, inertia = _lloyd(G, diag, W0, active, max_iter, (tol * mean_sq)[:, None], eps)
    best = inertia.argmin(1)  # the first restart of lowest inertia
    out = []
    for i in range(m):
        b = int(best[i])
        w, lab = W[i, b], labels[i, b]
        used = np.bincount(lab, minlength=k) > 0
        if not used.all():
            # drop clusters left empty by the final assignment (and inactive ones) and renumber labels
            remap = np.cumsum(used) - 1
            w, lab = w[used], remap[lab]
        out.append((np.ascontiguousarray(w), np.ascontiguousarray(lab), float(inertia[i, b])))
    return out
