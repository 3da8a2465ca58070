"""lego works on the P x P Grams of the pool; tests/lego_dense.py is the same method on the dense pool of
units (lora_lego's code before the change). Both must find the same clustering and, to float32 rounding,
the same merged factors, for every option combination."""

import itertools

import pytest
import torch

from lego_dense import lego_dense
from lego_dense import target_norm as dense_target_norm
from lora_lego.adapter import Factors
from lora_lego.methods.lego import LEGO_CANONICALIZATIONS, OUTPUT_REWEIGHTS, PARAM_REWEIGHTS, lego, target_norm
from lora_lego.msu import UNIT_SPLITS


def module(seed: int, n: int = 5, r: int = 6, d_in: int = 96, d_out: int = 64) -> list[Factors]:
    """LoRA-like factors: small A and B entries, a scale folded into B, ranks differing between inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        rj = r + j % 3 - 1
        out.append(Factors(0.02 * torch.randn(rj, d_in, generator=g), 0.02 * torch.randn(d_out, rj, generator=g), 2.0))
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


WEIGHTS = [1.0, 0.5, -0.7, 1.3, 0.2]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("canon,split", list(itertools.product(LEGO_CANONICALIZATIONS, UNIT_SPLITS)))
def test_gram_lego_equals_the_dense_reference_for_every_option(seed, canon, split):
    fs = module(seed)
    for pr, orw in itertools.product(PARAM_REWEIGHTS, OUTPUT_REWEIGHTS):
        kw = dict(param_reweight=pr, output_reweight=orw, unit_split=split, canonicalize=canon)
        got = lego(fs, WEIGHTS, 7, generator=torch.Generator().manual_seed(seed), **kw)
        want = lego_dense(fs, WEIGHTS, 7, generator=torch.Generator().manual_seed(seed), **kw)
        assert got.A.shape == want.A.shape, kw
        assert rel(got.A, want.A) <= 1e-5 and rel(got.B, want.B) <= 1e-5, kw
        assert got.A.is_contiguous() and got.B.is_contiguous()


def test_gram_lego_equals_the_dense_reference_with_duplicate_units_and_k_beyond_the_pool():
    # identical inputs: every unit has exact copies (the coincidence test of k-means decides), and k >= P
    f = module(3, n=1)[0]
    for k in (4, 20):
        for canon in LEGO_CANONICALIZATIONS:
            got = lego([f, f, f], [1.0, 1.0, 1.0], k, generator=torch.Generator().manual_seed(0), canonicalize=canon)
            want = lego_dense([f, f, f], [1.0, 1.0, 1.0], k, generator=torch.Generator().manual_seed(0), canonicalize=canon)
            assert got.A.shape == want.A.shape
            assert rel(got.delta(), want.delta()) <= 1e-5


@pytest.mark.parametrize("how", ["norm_mean", "norm_rms", "norm_sum", "norm_gain", "norm_geo"])
def test_norm_targets_from_grams_equal_the_float64_dense_computation(how):
    fs = module(4)
    dense64 = [Factors(f.A.double(), f.B.double()) for f in fs]
    assert abs(target_norm(fs, WEIGHTS, how) / dense_target_norm(dense64, WEIGHTS, how) - 1) <= 1e-6
