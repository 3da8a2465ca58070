import math

import pytest
import torch

from lora_lego.adapter import Factors
from lora_lego.methods.lego import lego, output_factor, parameter_reweight


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
    joint = parameter_reweight(centers, X, labels, 2, "joint")
    assert torch.allclose(joint.norm(dim=1), torch.tensor([math.sqrt(5), 5.0]))
    halves = parameter_reweight(centers, X, labels, 2, "halves")
    assert torch.allclose(halves[0, :2].norm(), torch.tensor(1.0)) and torch.allclose(halves[0, 2:].norm(), torch.tensor(2.0))
    assert torch.equal(parameter_reweight(centers, X, labels, 2, "none"), centers)


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

from lora_lego.methods.lego import target_norm, update_norm  # noqa: E402


def test_update_norm_is_the_frobenius_norm_of_the_product():
    f = rand_factors(r=5, d_in=7, d_out=9, seed=4)
    assert math.isclose(update_norm(f.A, f.B), float(f.delta().norm()), rel_tol=1e-6)


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
    for how in ("norm_mean", "norm_rms"):
        out = lego([f, permuted(f, 1), permuted(f, 2)], [1.0, 1.0, 1.0], None, generator=gen(), output_reweight=how)
        assert torch.allclose(out.delta(), f.delta(), atol=1e-4)


def test_summed_magnitude_gives_each_centroid_the_sum_of_member_update_norms():
    # units [a | b] with d_in = 2: update norms |a||b| are 2, 2 (cluster 0) and 5 * 3 (cluster 1)
    X = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [3.0, 4.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    centers = torch.stack([X[:2].mean(0), X[2]])
    out = parameter_reweight(centers, X, labels, 2, "sum")
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
