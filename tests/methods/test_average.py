import math

import pytest
import torch
from helpers import random_modules, write_peft

from lora_lego import load_adapter, merge
from lora_lego.adapter import Factors
from lora_lego.errors import LoraLegoError
from lora_lego.methods.average import average


def raw(r, seed, d_out=9, d_in=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, r, generator=g, dtype=torch.float64)


def test_average_is_the_product_of_the_averaged_halves():
    (A1, B1), (A2, B2) = raw(3, 0), raw(3, 1)
    s1, s2 = 0.5, 4.0  # B is stored with the scale folded in, as the readers give it
    f1, f2 = Factors(A1, s1 * B1, s1), Factors(A2, s2 * B2, s2)
    w = [0.3, 0.7]
    out = average([f1, f2], w)
    A = w[0] * math.sqrt(s1) * A1 + w[1] * math.sqrt(s2) * A2
    B = w[0] * math.sqrt(s1) * B1 + w[1] * math.sqrt(s2) * B2
    assert out.rank == 3
    assert torch.allclose(out.delta(), B @ A, atol=1e-12)
    # it is not the mean of the updates
    assert not torch.allclose(out.delta(), w[0] * f1.delta() + w[1] * f2.delta(), atol=1e-3)


def test_average_of_copies_with_weights_summing_to_one_returns_the_lora():
    A, B = raw(4, 2)
    f = Factors(A, 2.5 * B, 2.5)
    out = average([f, f, f], [1 / 3] * 3)
    assert torch.allclose(out.delta(), f.delta(), atol=1e-12)


def test_average_rank_below_input_rank_truncates_optimally():
    (A1, B1), (A2, B2) = raw(4, 3), raw(4, 4)
    full = average([Factors(A1, B1), Factors(A2, B2)], [0.5, 0.5])
    out = average([Factors(A1, B1), Factors(A2, B2)], [0.5, 0.5], 2)
    U, S, Vh = torch.linalg.svd(full.delta())
    assert out.rank == 2
    assert torch.allclose(out.delta(), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-10)


def test_average_refuses_unequal_ranks_naming_the_module(tmp_path):
    a = write_peft(tmp_path / "a", random_modules(4, 0), r=4, alpha=4)
    b = write_peft(tmp_path / "b", random_modules(2, 1), r=2, alpha=4)
    with pytest.raises(LoraLegoError, match=r"module model\.layers\.0\.self_attn\.q_proj: average needs equal ranks"):
        merge([load_adapter(a), load_adapter(b)], method="average")
    merged = merge([load_adapter(a), load_adapter(a)], method="average")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(merged.factors(name).delta(), load_adapter(a).factors(name).delta(), atol=1e-6)
