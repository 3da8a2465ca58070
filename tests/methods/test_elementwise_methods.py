import pytest
import torch
from helpers import random_adapter

from lora_lego import load_adapter, merge
from lora_lego.adapter import Factors
from lora_lego.elementwise import magnitude_trim, task_deltas
from lora_lego.errors import LoraLegoError
from lora_lego.methods import METHODS
from lora_lego.methods.dare import dare_linear, dare_linear_delta, dare_ties, dare_ties_delta
from lora_lego.methods.magnitude_prune import magnitude_prune, magnitude_prune_delta
from lora_lego.methods.ties import ties, ties_delta


def rand_factors(r, seed, d_out=20, d_in=16):
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))


def svd_k(M, k):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_density_one_reduces_dare_linear_and_magnitude_prune_to_the_truncated_weighted_sum():
    fs = [rand_factors(4, s) for s in range(3)]
    w = [0.5, -1.0, 2.0]
    ref = svd_k(sum(wi * f.delta() for wi, f in zip(w, fs)), 4)
    for fn in (dare_linear, magnitude_prune):
        out = fn(fs, w, None, generator=gen(), density=1.0)
        assert out.rank == 4
        assert torch.allclose(out.delta().double(), ref, atol=1e-4)


def test_ties_of_identical_inputs_returns_the_trimmed_update_at_rank_k():
    f = rand_factors(3, 0)
    out = ties([f, f], [1.0, 1.0], 20, generator=gen(), density=0.5)
    trimmed = magnitude_trim(f.delta(), 0.5)
    assert torch.allclose(out.delta(), trimmed, atol=1e-5)  # rank 20 >= 16: nothing truncated
    assert torch.allclose(ties_delta(task_deltas([f, f]), [1.0, 1.0], 0.5, "total"), trimmed)


def test_dare_methods_are_seeded_by_the_generator():
    fs = [rand_factors(4, s) for s in range(2)]
    for fn in (dare_linear, dare_ties):
        a = fn(fs, [1.0, 1.0], 3, generator=gen(5), density=0.4)
        b = fn(fs, [1.0, 1.0], 3, generator=gen(5), density=0.4)
        c = fn(fs, [1.0, 1.0], 3, generator=gen(6), density=0.4)
        assert torch.equal(a.delta(), b.delta()) and not torch.allclose(a.delta(), c.delta())


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_elementwise_methods_end_to_end_are_reproducible_and_reach_the_rank(tmp_path, method):
    paths = [random_adapter(tmp_path / f"a{i}", rank=4, seed=i) for i in range(3)]
    runs = [merge([load_adapter(p) for p in paths], method=method, rank=3, seed=7, density=0.5) for _ in range(2)]
    for name, spec in runs[0].modules.items():
        assert spec.rank == 3
        assert torch.equal(runs[0].factors(name).B, runs[1].factors(name).B)
        assert torch.count_nonzero(runs[0].factors(name).delta()) > 0


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1, "half"])
def test_density_outside_0_1_is_refused(tmp_path, density):
    p = random_adapter(tmp_path / "a", rank=4)
    with pytest.raises(LoraLegoError, match=r"--density must be in \(0, 1\]"):
        merge([load_adapter(p)] * 2, method="ties", density=density)


def test_density_does_not_apply_to_linear(tmp_path):
    p = random_adapter(tmp_path / "a", rank=4)
    with pytest.raises(LoraLegoError, match="option --density does not apply to method linear"):
        merge([load_adapter(p)] * 2, method="linear", density=0.5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_on_a_larger_module_the_result_is_the_truncated_svd_of_the_merged_update(method):
    # 240 x 200 with Σ r_i = 12: the truncation takes the subspace-iteration path
    fs = [rand_factors(4, s, d_out=240, d_in=200) for s in range(3)]
    w = [1.0, 0.7, -0.4]
    deltas = task_deltas(fs)
    merged = {"ties": lambda: ties_delta(deltas, w, 0.3, "total"),
              "dare_linear": lambda: dare_linear_delta(deltas, w, 0.3, gen(3)),
              "dare_ties": lambda: dare_ties_delta(deltas, w, 0.3, "total", gen(3)),
              "magnitude_prune": lambda: magnitude_prune_delta(deltas, w, 0.3)}[method]()
    out = METHODS[method].fn(fs, w, 5, generator=gen(3), density=0.3)
    ref = svd_k(merged, 5)
    assert out.rank == 5
    assert (out.delta().double() - ref).norm() <= 1e-4 * ref.norm()
