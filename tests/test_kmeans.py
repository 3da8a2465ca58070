import math

import torch

from lora_lego.kmeans import gram_matrix, kmeans, kmeans_gram


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blobs(k=4, per=10, d=6, spread=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 5
    X = centers.repeat_interleave(per, 0) + spread * torch.randn(k * per, d, generator=g)
    return X, centers


def test_recovers_separated_clusters():
    X, centers = blobs()
    res = kmeans(X, 4, generator=gen())
    assert res.centers.shape == (4, 6)
    # each true centre has a found centre within the noise level
    d = torch.cdist(centers, res.centers)
    assert d.min(1).values.max() < 0.05
    # points of one blob share a label
    assert all(len(set(res.labels[i * 10:(i + 1) * 10].tolist())) == 1 for i in range(4))


def test_k_at_least_n_keeps_every_point():
    X = torch.randn(5, 3, generator=gen())
    res = kmeans(X, 7, generator=gen())
    assert torch.equal(res.centers, X) and torch.equal(res.labels, torch.arange(5))


def test_fewer_distinct_points_than_k_forms_fewer_clusters():
    base = torch.randn(3, 4, generator=gen())
    X = base.repeat(4, 1)  # 12 points, 3 distinct
    res = kmeans(X, 5, generator=gen())
    assert res.centers.shape[0] == 3
    assert res.inertia == 0.0


def test_all_zero_points_give_one_zero_cluster():
    res = kmeans(torch.zeros(8, 5), 3, generator=gen())
    assert res.centers.shape[0] == 1 and torch.all(res.centers == 0)


def test_same_seed_bit_identical_and_restarts_keep_lowest_inertia():
    X = torch.randn(60, 8, generator=gen(3))
    a = kmeans(X, 6, generator=gen(1))
    b = kmeans(X, 6, generator=gen(1))
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    singles = [kmeans(X, 6, generator=gen(s), n_init=1).inertia for s in range(10)]
    many = kmeans(X, 6, generator=gen(0), n_init=10).inertia
    assert many <= min(singles) * 1.05  # the best of 10 restarts is about the best of 10 single runs
    assert many <= sorted(singles)[len(singles) // 2]


def test_inertia_matches_labels_and_centers():
    X = torch.randn(40, 5, generator=gen(2))
    res = kmeans(X, 4, generator=gen())
    direct = ((X - res.centers[res.labels]) ** 2).sum().item()
    assert abs(direct - res.inertia) < 1e-4 * max(direct, 1)
    # every point is assigned to its nearest centre
    assert torch.equal(torch.cdist(X, res.centers).argmin(1), res.labels)


def direct_kmeans(X, k, generator, n_init=10, max_iter=100):
    """Reference: the same algorithm with exact differences x - c instead of the Gram matrix, drawing the
    same uniforms (R x k x t) for k-means++ by inverse-CDF sampling."""
    n = X.shape[0]
    t = 2 + int(math.log(k))
    u = torch.rand(n_init, k, t, generator=generator, dtype=torch.float64)
    best = None
    for r in range(n_init):
        first = min(int(u[r, 0, 0] * n), n - 1)
        chosen = [first]
        closest = ((X - X[first]) ** 2).sum(1)
        for s in range(1, k):
            cum = closest.double().cumsum(0)
            cand = [min(int(torch.searchsorted(cum, float(v) * float(cum[-1]), right=True)), n - 1) for v in u[r, s]]
            pots = [torch.minimum(closest, ((X - X[c]) ** 2).sum(1)) for c in cand]
            i = min(range(len(cand)), key=lambda j: float(pots[j].sum()))
            chosen.append(cand[i])
            closest = pots[i]
        C = X[chosen].clone()
        labels = None
        for _ in range(max_iter):
            new = torch.cdist(X.double(), C.double()).argmin(1)
            C = torch.stack([X[new == j].mean(0) for j in range(k)])
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
        labels = torch.cdist(X.double(), C.double()).argmin(1)
        inertia = float(((X - C[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (C, labels, inertia)
    return best


def test_gram_kmeans_equals_the_direct_computation():
    # units of LoRA-like pools: a few hundred points in thousands of dimensions, loosely clustered
    g = gen(11)
    X = (torch.randn(6, 3000, generator=g).repeat_interleave(8, 0) + 0.5 * torch.randn(48, 3000, generator=g))
    for seed in range(3):
        C, labels, inertia = direct_kmeans(X, 6, gen(seed))
        res = kmeans(X, 6, generator=gen(seed))
        assert torch.equal(res.labels, labels)
        assert torch.allclose(res.centers, C, atol=1e-5)
        assert abs(res.inertia - inertia) < 1e-4 * inertia


def test_batched_modules_give_the_same_result_as_one_at_a_time():
    Xs = [torch.randn(40, 30, generator=gen(s)) for s in range(3)]
    G = torch.stack([gram_matrix(X) for X in Xs])
    batch = kmeans_gram(G, 5, generators=[gen(10 + s) for s in range(3)])
    for s, X in enumerate(Xs):
        one = kmeans_gram(gram_matrix(X), 5, generators=[gen(10 + s)])[0]
        assert torch.equal(one.labels, batch[s].labels) and torch.equal(one.weights, batch[s].weights)
        # centre j = weights[j] @ X is the mean of its members
        for j in range(one.weights.shape[0]):
            assert torch.allclose(one.weights[j] @ X, X[one.labels == j].mean(0), atol=1e-6)


def test_an_empty_cluster_is_reseeded_with_the_point_farthest_from_its_centre():
    import numpy as np

    from lora_lego.kmeans_core import _lloyd

    X = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 0.0], [5.1, 0.0], [9.0, 0.0]], dtype=torch.float64)
    G = gram_matrix(X).numpy()[None]
    W0 = np.zeros((1, 1, 3, 6))
    W0[0, 0, 0, 0] = 1.0  # centre 0 on x0
    W0[0, 0, 1, 3] = 1.0  # centre 1 on x3
    W0[0, 0, 2, 3] = -20.0  # centre 2 far from every point: its cluster starts empty
    W, labels, inertia = _lloyd(G, np.diagonal(G, axis1=1, axis2=2), W0, np.ones((1, 1, 3), dtype=bool), 100,
                                np.zeros((1, 1)), 1e-12)
    # (9, 0), 4 away from centre 1, was the farthest point: it alone re-seeds cluster 2
    assert labels[0, 0].tolist() == [0, 0, 0, 1, 1, 2]
    assert torch.allclose(torch.from_numpy(W[0, 0]) @ X, torch.tensor([[1 / 30, 1 / 30], [5.05, 0.0], [9.0, 0.0]], dtype=torch.float64))


def test_fewer_distinct_points_than_k_are_found_by_the_initialisation():
    # 6 coincident points and 2 others: 3 distinct points for k = 4 give 3 clusters and inertia 0
    X = torch.cat([torch.zeros(6, 2), torch.tensor([[10.0, 0.0], [0.0, 10.0]])])
    res = kmeans(X, 4, generator=gen())
    assert res.centers.shape[0] == 3 and res.inertia == 0.0


def test_gram_matrix_by_blocks_equals_x_xt():
    X = torch.randn(100, 300, generator=gen(4), dtype=torch.float64)
    G = gram_matrix(X)
    assert torch.allclose(G, X @ X.T, rtol=1e-12, atol=1e-10)
    for cut in (25, 50, 75):  # 4 groups of 25 rows: every block below the diagonal is one above, transposed
        assert torch.equal(G[cut:, :cut], G[:cut, cut:].T)
