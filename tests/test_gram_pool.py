"""The pool in Gram space (msu.GramPool) is the dense pool of msu.pool_units: the same units as scalings of
the raw stacked factors, the same inner products."""

import itertools

import pytest
import torch

from lora_lego.adapter import Factors
from lora_lego.kmeans import kmeans_gram
from lora_lego.msu import CANONICALIZATIONS, UNIT_SPLITS, canonicalize_units, gram_pool, pool_units, sign_of_largest


def rand_factors(r, d_in=9, d_out=7, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype) * scale, scale)


@pytest.mark.parametrize("split,how", list(itertools.product(UNIT_SPLITS, CANONICALIZATIONS)))
def test_scaled_raw_factors_are_the_pooled_units(split, how):
    fs = [rand_factors(3, seed=1, scale=0.5), rand_factors(5, seed=2, scale=3.0)]
    w = [0.7, -1.6]
    X, d_in = pool_units(fs, w, split, how)
    pool = gram_pool(fs, w, split, how)
    sa, sb = torch.from_numpy(pool.sa), torch.from_numpy(pool.sb)
    units = torch.cat([sa[:, None] * pool.A, (pool.B * sb).T], dim=1)
    assert torch.allclose(units, X, rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.from_numpy(pool.gram()), X @ X.T, rtol=1e-12, atol=1e-12)
    na, nb = (torch.from_numpy(x) for x in pool.half_norms())
    assert torch.allclose(na, X[:, :d_in].norm(dim=1)) and torch.allclose(nb, X[:, d_in:].norm(dim=1))


def test_grams_are_multiplied_in_the_factors_dtype():
    f = rand_factors(4, dtype=torch.float32)
    pool = gram_pool([f, f], [1.0, 1.0])
    GA, GB = torch.from_numpy(pool.GA), torch.from_numpy(pool.GB)
    assert GA.dtype == torch.float64
    # float32 products (numpy's BLAS on the CPU, see msu.gram64), each value a float32 one
    assert torch.equal(GA[:4, :4], torch.from_numpy(f.A.numpy() @ f.A.numpy().T).double())
    assert torch.equal(GA, GA.float().double()) and torch.equal(GB, GB.float().double())
    assert torch.allclose(GB[:4, :4], (f.B.T.double() @ f.B.double()), rtol=1e-5, atol=1e-6)


def test_sign_of_largest_matches_canonicalisation_including_ties():
    A = torch.tensor([[1.0, -3.0, 2.0],   # largest is negative
                      [-2.0, 2.0, 0.5],   # +2 and -2 tie: the first, -2, decides
                      [2.0, -2.0, 0.5],   # the first, +2, decides
                      [0.0, 0.0, 0.0],    # zero row: +1
                      [0.5, 0.25, -0.1]])
    want = canonicalize_units(A, torch.ones(5, 1), "sign")[1][:, 0].double()
    assert torch.equal(sign_of_largest(A), want)
    assert torch.equal(want, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


def test_precision_decides_when_points_of_a_float64_gram_coincide():
    # two points a float32 rounding apart: with float32's precision they are one point (fewer than k
    # distinct points -> fewer clusters), with float64's (exact products here) they are two
    X = torch.randn(5, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X = torch.cat([X, X[:2] * (1 + 1e-6)])  # 7 points, 5 distinct to float32 precision
    G = X @ X.T
    gen = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    as32 = kmeans_gram(G, 6, generators=gen(), precision=torch.float32)[0]
    as64 = kmeans_gram(G, 6, generators=gen())[0]
    assert as32.weights.shape[0] == 5 and as64.weights.shape[0] == 6
