import math

import pytest
import torch

from lora_lego.adapter import Factors
from lora_lego.lego_core import member_rescale, output_factor
from lora_lego.methods.lego import lego
from lora_lego.msu import gram_pool


def rescaled_centers(X: torch.Tensor, labels: torch.Tensor, d_in: int, how: str) -> torch.Tensor:
    """The cluster means of the units X (rows [a | b]) rescaled by ``member_rescale``, formed densely."""
    pool = gram_pool([Factors(X[:, :d_in].double(), X[:, d_in:].T.double())], [1.0])
    k = int(labels.max()) + 1
    M = torch.zeros(k, X.shape[0], dtype=torch.float64)
    M[labels, torch.arange(X.shape[0])] = 1.0
    M /= M.sum(1, keepdim=True)
    fa, fb = (torch.from_numpy(f) for f in member_rescale(pool, M.numpy(), M.numpy(), labels.numpy(), how))
    C = M @ X.double()
    return torch.cat([C[:, :d_in] * fa[:, None], C[:, d_in:] * fb[:, None]], dim=1).float()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_factors(r=4, d_in=10, d_out=8, seed=0, scale=1.0):
    g = gen(seed)
    return Factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * scale, scale)


def permuted(f: Factors, seed: int) -> Factors:
    p = torch.randperm(f.rank, generator=gen(seed))
    return Factors(f.A[p], f.B[:, p], f.scale)


@pytest.mark.parametrize("pr", ["joint", "halves", "none"])
@pytest.mark.parametrize("split", ["b", "sqrt"])
def test_self_merge_with_permuted_copies_returns_the_lora(pr, split):
    f = rand_factors(r=6, scale=2.0)
    out = lego([f, permuted(f, 1), permuted(f, 2)], [1.0, 1.0, 1.0], None, generator=gen(), param_reweight=pr, unit_split=split)
    assert out.rank == 6
    assert torch.allclose(out.delta(), f.delta(), atol=1e-5)


def test_permutation_invariance_when_clusters_are_clear():
    # units of two LoRAs are noisy copies of 4 well-separated directions: the clustering is unambiguous
    g = gen(5)
    base_a, base_b = torch.randn(4, 12, generator=g) * 3, torch.randn(9, 4, generator=g) * 3
    def noisy(seed):
        gg = gen(seed)
        return Factors(base_a + 0.01 * torch.randn(4, 12, generator=gg), base_b + 0.01 * torch.randn(9, 4, generator=gg))
    f1, f2 = noisy(1), noisy(2)
    ref = lego([f1, f2], [1.0, 1.0], 4, generator=gen())
    for s in range(3):
        out = lego([permuted(f1, 10 + s), permuted(f2, 20 + s)], [1.0, 1.0], 4, generator=gen(s))
        assert torch.allclose(out.delta(), ref.delta(), atol=1e-4)


def test_k_at_least_pool_size_keeps_every_unit_exactly_invariant():
    f1, f2 = rand_factors(r=3, seed=1), rand_factors(r=5, seed=2)
    out = lego([f1, f2], [1.0, 1.0], 8, generator=gen(), output_reweight="none", canonicalize="none")
    assert torch.allclose(out.delta(), f1.delta() + f2.delta(), atol=1e-5)
    out_p = lego([permuted(f1, 3), permuted(f2, 4)], [1.0, 1.0], 8, generator=gen(9), output_reweight="none",
                 canonicalize="none")
    assert torch.allclose(out_p.delta(), out.delta(), atol=1e-5)
    # the paper's output reweighting then multiplies by sqrt(mean rank / k) = sqrt(4/8)
    out_s = lego([f1, f2], [1.0, 1.0], 8, generator=gen(), output_reweight="sqrt", canonicalize="none")
    assert torch.allclose(out_s.delta(), out.delta() * math.sqrt(0.5), atol=1e-5)


def test_same_generator_seed_is_bit_identical():
    fs = [rand_factors(r=8, seed=s) for s in range(3)]
    a = lego(fs, [1.0, 0.5, -0.3], 5, generator=gen(7))
    b = lego(fs, [1.0, 0.5, -0.3], 5, generator=gen(7))
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_parameter_reweighting_restores_member_norms():
    X = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [3.0, 4.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    centers = torch.stack([X[:2].mean(0), X[2]])
    joint = rescaled_centers(X, labels, 2, "joint")
    assert torch.allclose(joint.norm(dim=1), torch.tensor([math.sqrt(5), 5.0]))
    halves = rescaled_centers(X, labels, 2, "halves")
    assert torch.allclose(halves[0, :2].norm(), torch.tensor(1.0)) and torch.allclose(halves[0, 2:].norm(), torch.tensor(2.0))
    assert torch.equal(rescaled_centers(X, labels, 2, "none"), centers)


def test_output_factor_variants():
    assert output_factor(8, 2, "sqrt") == 2.0
    assert output_factor(8, 2, "linear") == 4.0
    assert output_factor(8, 2, "none") == 1.0


def test_dead_units_and_all_zero_modules_stay_finite():
    live = rand_factors(r=4)
    dead = Factors(torch.randn(4, 10, generator=gen(3)), torch.zeros(8, 4))
    for pr in ("joint", "halves", "none"):
        out = lego([live, dead], [1.0, 1.0], 4, generator=gen(), param_reweight=pr)
        assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
        zero = lego([Factors(torch.zeros(4, 10), torch.zeros(8, 4))] * 2, [1.0, 1.0], 4, generator=gen(), param_reweight=pr)
        assert torch.isfinite(zero.A).all() and torch.isfinite(zero.B).all()
        assert torch.count_nonzero(zero.delta()) == 0


def test_negative_weight_flips_the_update():
    f = rand_factors(r=4)
    out = lego([f], [-1.0], 4, generator=gen())
    assert torch.allclose(out.delta(), -f.delta(), atol=1e-5)


# -- variants beyond the paper: norm-matched output, summed magnitudes, clustering directions -----------

from lora_lego.lego_core import update_norm_sq  # noqa: E402
from lora_lego.methods.lego import target_norm  # noqa: E402


def test_update_norm_from_grams_is_the_frobenius_norm_of_the_combined_factors():
    # A' = Ca A, B' = B Cbᵀ: ||B' A'||² from the k x k products of the Grams, against the dense float64 update
    f = rand_factors(r=5, d_in=7, d_out=9, seed=4)
    g = gen(6)
    Ca, Cb = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    A, B = f.A.double(), f.B.double()
    dense = float(((B @ Cb.T) @ (Ca @ A)).norm()) ** 2
    assert math.isclose(update_norm_sq(A @ A.T, B.T @ B, Ca, Cb), dense, rel_tol=1e-12)


@pytest.mark.parametrize("how", ["norm_mean", "norm_rms", "norm_sum"])
def test_norm_matched_output_has_the_target_norm(how):
    fs = [rand_factors(r=4, seed=s) for s in range(3)]
    w = [1.0, 0.5, -2.0]
    deltas = [wi * f.delta() for f, wi in zip(fs, w)]
    want = {"norm_sum": float(sum(deltas).norm()),
            "norm_mean": float(sum(deltas).norm()) / 3,
            "norm_rms": math.sqrt(sum(float(d.norm()) ** 2 for d in deltas) / 3)}[how]
    assert math.isclose(target_norm(fs, w, how), want, rel_tol=1e-6)
    out = lego(fs, w, 3, generator=gen(), output_reweight=how)
    assert math.isclose(float(out.delta().norm()), want, rel_tol=1e-5)


def test_norm_matched_self_merge_returns_the_lora():
    # a LoRA with permuted copies of itself: norm_mean and norm_rms both give back its own norm, hence the LoRA
    f = rand_factors(r=6, scale=2.0)
    for how in ("norm_mean", "norm_rms", "norm_gain", "norm_geo"):
        out = lego([f, permuted(f, 1), permuted(f, 2)], [1.0, 1.0, 1.0], None, generator=gen(), output_reweight=how)
        assert torch.allclose(out.delta(), f.delta(), atol=1e-4)


def dense_gain(deltas: list[torch.Tensor]) -> float:
    n = len(deltas)
    rms2 = sum(float(d.double().norm()) ** 2 for d in deltas) / n
    mean = float((sum(d.double() for d in deltas) / n).norm())
    return rms2 / max(mean, math.sqrt(rms2 / n))


@pytest.mark.parametrize("how", ["norm_gain", "norm_geo"])
@pytest.mark.parametrize("case", ["random", "overlapping", "cancelling"])
def test_gain_output_has_rms_squared_over_mean_norm(how, case):
    fs = [rand_factors(r=4, seed=s) for s in range(3)]
    w = [1.0, 0.5, -2.0]
    if case == "overlapping":  # the same update plus a little noise: the ||mean|| branch, no floor
        fs = [Factors(fs[0].A + 0.1 * f.A, fs[0].B + 0.1 * f.B) for f in fs]
        w = [1.0, 0.5, 2.0]
    if case == "cancelling":  # an update and nearly its negation: ||mean|| is floored at rms / sqrt(N)
        fs = [fs[0], Factors(fs[0].A + 0.05 * fs[1].A, fs[0].B), fs[2]]
        w = [1.0, -1.0, 0.3]
    deltas = [wi * f.delta() for f, wi in zip(fs, w)]
    rms = math.sqrt(sum(float(d.double().norm()) ** 2 for d in deltas) / 3)
    mean = float((sum(d.double() for d in deltas) / 3).norm())
    if case == "overlapping":
        assert mean > rms / math.sqrt(3)
    if case == "cancelling":
        assert mean < rms / math.sqrt(3)
    gain = dense_gain(deltas)
    want = gain if how == "norm_gain" else math.sqrt(rms * gain)
    assert math.isclose(target_norm(fs, w, how), want, rel_tol=1e-6)
    out = lego(fs, w, 3, generator=gen(), output_reweight=how)
    assert math.isclose(float(out.delta().norm()), want, rel_tol=1e-5)


def test_gain_of_orthogonal_updates_is_the_norm_of_their_sum():
    # updates on disjoint input and output coordinates: rms² / ||mean|| = rms·sqrt(N) = ||sum||
    g = torch.Generator().manual_seed(3)
    fs = []
    for j in range(4):
        A, B = torch.zeros(2, 16), torch.zeros(12, 2)
        A[:, 4 * j:4 * j + 4] = torch.randn(2, 4, generator=g)
        B[3 * j:3 * j + 3] = torch.randn(3, 2, generator=g)
        fs.append(Factors(A, B))
    w = [1.0] * 4
    assert math.isclose(target_norm(fs, w, "norm_gain"), float(sum(f.delta() for f in fs).norm()), rel_tol=1e-6)


def test_gain_of_zero_inputs_is_zero():
    f = Factors(torch.zeros(2, 5), torch.zeros(4, 2))
    assert target_norm([f, f], [1.0, 1.0], "norm_gain") == 0.0
    assert target_norm([f, f], [1.0, 1.0], "norm_geo") == 0.0


def test_summed_magnitude_gives_each_centroid_the_sum_of_member_update_norms():
    # units [a | b] with d_in = 2: update norms |a||b| are 2, 2 (cluster 0) and 5 * 3 (cluster 1)
    X = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [3.0, 4.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    centers = torch.stack([X[:2].mean(0), X[2]])
    out = rescaled_centers(X, labels, 2, "sum")
    update = out[:, :2].norm(dim=1) * out[:, 2:].norm(dim=1)
    assert torch.allclose(update, torch.tensor([4.0, 15.0]))
    # direction unchanged
    assert torch.allclose(out[0] / out[0].norm(), centers[0] / centers[0].norm())


def test_direction_clustering_joins_a_unit_with_its_rescaled_negation():
    # the same rank-1 update written as (a, b), (-2a, -b/2): different points, one direction once balanced
    f = rand_factors(r=3, seed=8)
    g = Factors(-2 * f.A, -0.5 * f.B)
    assert torch.allclose(g.delta(), f.delta())
    out = lego([f, g], [1.0, 1.0], 3, generator=gen(), canonicalize="direction", param_reweight="joint", output_reweight="none")
    assert torch.allclose(out.delta(), f.delta(), atol=1e-4)
    out_sum = lego([f, g], [1.0, 1.0], 3, generator=gen(), canonicalize="direction", param_reweight="sum", output_reweight="none")
    # summed magnitudes: each centroid's update carries both members' (the exact sum of the two updates)
    assert torch.allclose(out_sum.delta(), 2 * f.delta(), atol=1e-3)
