"""Parity with PEFT 0.21.2 (pinned in the test extras): where PEFT computes the same merge, the same inputs give
the same ΔW."""

import pytest
import torch
from helpers import peft_adapter

from lora_lego import load_adapter, merge
from lora_lego.methods.dare import dare_linear_delta, dare_ties_delta
from lora_lego.methods.magnitude_prune import magnitude_prune_delta
from lora_lego.methods.ties import ties_delta

peft_merge_utils = pytest.importorskip("peft.utils.merge_utils")


def task_tensors(n=3, d_out=24, d_in=20, r=4, seed=0):
    """Dense updates of LoRAs (low rank, like the real ones) plus one full-rank tensor."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g) for _ in range(n - 1)]
    return out + [torch.randn(d_out, d_in, generator=g)]


WEIGHTS = [1.0, -0.6, 0.3]


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_peft_merge_utils(density, sign):
    tasks = task_tensors()
    ref = peft_merge_utils.ties(tasks, torch.tensor(WEIGHTS), density, sign)
    assert torch.allclose(ties_delta(tasks, WEIGHTS, density, sign), ref, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.55])
def test_magnitude_prune_matches_peft_merge_utils(density):
    tasks = task_tensors(seed=1)
    ref = peft_merge_utils.magnitude_prune(tasks, torch.tensor(WEIGHTS), density)
    assert torch.allclose(magnitude_prune_delta(tasks, WEIGHTS, density), ref, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_matches_peft_merge_utils_on_the_same_random_stream(density):
    tasks = task_tensors(seed=2)
    # PEFT draws from the global generator; ours from the one it is given: seeded alike, they agree
    torch.manual_seed(11)
    ref_linear = peft_merge_utils.dare_linear(tasks, torch.tensor(WEIGHTS), density)
    ours_linear = dare_linear_delta(tasks, WEIGHTS, density, torch.Generator().manual_seed(11))
    assert torch.allclose(ours_linear, ref_linear, atol=1e-5)
    torch.manual_seed(12)
    ref_ties = peft_merge_utils.dare_ties(tasks, torch.tensor(WEIGHTS), density, "total")
    ours_ties = dare_ties_delta(tasks, WEIGHTS, density, "total", torch.Generator().manual_seed(12))
    assert torch.allclose(ours_ties, ref_ties, atol=1e-5)


@pytest.fixture(scope="module")
def three_adapters(tiny_base, tmp_path_factory):
    """Real PEFT adapters of different ranks, alphas and scalings on one tiny model."""
    root = tmp_path_factory.mktemp("parity")
    specs = [dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=6), dict(r=6, lora_alpha=4, use_rslora=True)]
    return [peft_adapter(tiny_base, root / f"a{i}", seed=10 + i, **kw) for i, kw in enumerate(specs)]


def peft_weighted_deltas(base_dir, adapter_dirs, weights, **kwargs) -> dict[str, torch.Tensor]:
    """ΔW per module of PEFT's add_weighted_adapter result."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapter_dirs))], weights, "merged", **kwargs)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("merged").float()
    return out


def assert_same_deltas(ours, peft_deltas, rtol):
    assert set(ours.modules) == set(peft_deltas) and peft_deltas
    for name, ref in peft_deltas.items():
        assert (ours.factors(name).delta() - ref).norm() <= rtol * ref.norm(), name


def test_concat_matches_peft_cat(tiny_base, three_adapters):
    w = [0.7, -1.2, 0.5]
    ref = peft_weighted_deltas(tiny_base, three_adapters, w, combination_type="cat")
    ours = merge([load_adapter(p) for p in three_adapters], method="concat", weights=w)
    assert_same_deltas(ours, ref, 1e-6)
    assert all(s.rank == 12 for s in ours.modules.values())


@pytest.mark.parametrize("rank", [3, 6])
def test_linear_matches_peft_svd(tiny_base, three_adapters, rank):
    w = [0.7, -1.2, 0.5]
    ref = peft_weighted_deltas(tiny_base, three_adapters, w, combination_type="svd", svd_rank=rank)
    ours = merge([load_adapter(p) for p in three_adapters], method="linear", weights=w, rank=rank)
    assert_same_deltas(ours, ref, 1e-5)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_ties_and_magnitude_prune_match_peft_svd_variants(tiny_base, three_adapters, method):
    w = [1.0, 0.8, -0.5]
    ref = peft_weighted_deltas(tiny_base, three_adapters, w, combination_type=f"{method}_svd", svd_rank=4, density=0.5)
    ours = merge([load_adapter(p) for p in three_adapters], method=method, weights=w, rank=4, density=0.5)
    assert_same_deltas(ours, ref, 1e-5)


def test_peft_linear_is_average_with_square_root_weights(tiny_base, three_adapters, tmp_path):
    """PEFT's `linear` averages A and B separately with √(w_i s_i) on each: our average with weights √w_i.
    It is not the weighted sum of the updates that our `linear` approximates."""
    equal_rank = [three_adapters[0], peft_adapter(tiny_base, tmp_path / "r4", seed=20, r=4, lora_alpha=16)]
    w = [0.25, 0.64]
    ref = peft_weighted_deltas(tiny_base, equal_rank, w, combination_type="linear")
    ours = merge([load_adapter(p) for p in equal_rank], method="average", weights=[0.5, 0.8])
    assert_same_deltas(ours, ref, 1e-6)
    summed = merge([load_adapter(p) for p in equal_rank], method="linear", weights=w, rank=4)
    name = next(iter(ref))
    assert not torch.allclose(summed.factors(name).delta(), ref[name], atol=1e-3)
