import torch

from lora_lego.kmeans import kmeans


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
