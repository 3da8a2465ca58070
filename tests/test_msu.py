import pytest
import torch

from lora_lego.adapter import Factors
from lora_lego.msu import canonicalize_units, factors_from_units, pool_units, units_from_factors


def rand_factors(r=4, d_in=7, d_out=5, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * scale, scale)


def test_units_reassemble_weighted_delta_for_both_splits():
    f = rand_factors()
    for split in ("b", "sqrt"):
        for w in (1.0, -0.7, 2.5):
            Ua, Ub = units_from_factors(f, w, split)
            assert torch.allclose(Ub.T @ Ua, w * f.delta(), atol=1e-5)


def test_sqrt_split_balances_scale():
    f = rand_factors(scale=4.0)
    Ua, Ub = units_from_factors(f, 1.0, "sqrt")
    assert torch.allclose(Ua, f.A * 2.0) and torch.allclose(Ub, (f.B / 4.0 * 2.0).T)


def test_canonicalisation_keeps_each_rank_one_update():
    f = rand_factors(r=6)
    Ua, Ub = units_from_factors(f)
    for how in ("none", "sign", "balance"):
        Ca, Cb = canonicalize_units(Ua, Ub, how)
        for i in range(6):
            assert torch.allclose(torch.outer(Cb[i], Ca[i]), torch.outer(Ub[i], Ua[i]), atol=1e-5)


def test_sign_makes_negated_unit_coincide_and_balance_equalises_norms():
    f = rand_factors(r=3)
    Ua, Ub = units_from_factors(f)
    Ca, Cb = canonicalize_units(torch.cat([Ua, -Ua]), torch.cat([Ub, -Ub]), "sign")
    assert torch.equal(Ca[:3], Ca[3:]) and torch.equal(Cb[:3], Cb[3:])
    Ba, Bb = canonicalize_units(Ua * 3, Ub / 5, "balance")
    assert torch.allclose(Ba.norm(dim=1), Bb.norm(dim=1), rtol=1e-5)


def test_pool_of_concatenated_units_sums_outputs():
    fs = [rand_factors(r=r, seed=s) for r, s in ((3, 0), (5, 1))]
    X, d_in = pool_units(fs, [1.0, -2.0])
    merged = factors_from_units(X, d_in)
    assert merged.rank == 8
    assert torch.allclose(merged.delta(), fs[0].delta() - 2.0 * fs[1].delta(), atol=1e-5)


def test_pool_rows_are_the_weighted_units_exactly():
    # the direct write of the default split must give the very values units_from_factors gives
    fs = [rand_factors(r=r, seed=s) for r, s in ((3, 2), (4, 3))]
    X, d_in = pool_units(fs, [0.7, -1.3])
    units = [units_from_factors(f, w) for f, w in zip(fs, [0.7, -1.3])]
    assert torch.equal(X[:, :d_in], torch.cat([u[0] for u in units]))
    assert torch.equal(X[:, d_in:], torch.cat([u[1] for u in units]))


def test_zero_units_stay_finite():
    f = Factors(torch.randn(3, 4), torch.zeros(5, 3))
    Ca, Cb = canonicalize_units(*units_from_factors(f), "balance")
    assert torch.isfinite(Ca).all() and torch.isfinite(Cb).all()


@pytest.mark.parametrize("split", ["b", "sqrt"])
@pytest.mark.parametrize("how", ["none", "sign", "balance"])
def test_pool_canonicalized_in_place_equals_units_one_input_at_a_time(split, how):
    fs = [rand_factors(r=r, seed=s) for r, s in ((3, 4), (2, 5))]
    before = [(f.A.clone(), f.B.clone()) for f in fs]
    X, d_in = pool_units(fs, [0.5, -2.0], split, how)
    units = [canonicalize_units(*units_from_factors(f, w, split), how) for f, w in zip(fs, [0.5, -2.0])]
    assert torch.allclose(X[:, :d_in], torch.cat([u[0] for u in units]), rtol=1e-6, atol=1e-7)
    assert torch.allclose(X[:, d_in:], torch.cat([u[1] for u in units]), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(f.A, a) and torch.equal(f.B, b) for f, (a, b) in zip(fs, before))  # inputs untouched
