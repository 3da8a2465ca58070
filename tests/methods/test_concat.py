import torch

from lora_lego.adapter import Factors
from lora_lego.methods.concat import concat_factors


def test_concatenation_equals_weighted_summation():
    g = torch.Generator().manual_seed(0)
    fs = [Factors(torch.randn(r, 9, generator=g, dtype=torch.float64), torch.randn(11, r, generator=g, dtype=torch.float64))
          for r in (2, 5, 3)]
    w = [0.5, -1.25, 2.0]
    out = concat_factors(fs, w)
    assert out.rank == 10
    expected = sum(wi * f.delta() for wi, f in zip(w, fs))
    assert torch.allclose(out.delta(), expected, atol=1e-12)


def test_concat_is_invariant_to_unit_permutation():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    p = torch.randperm(6, generator=g)
    other = Factors(torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64))
    a = concat_factors([Factors(A, B), other], [1.0, 0.3]).delta()
    b = concat_factors([Factors(A[p], B[:, p]), other], [1.0, 0.3]).delta()
    assert torch.allclose(a, b, atol=1e-12)
