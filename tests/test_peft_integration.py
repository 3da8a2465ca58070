"""merge_peft_adapters against a real tiny PeftModel."""

import pytest
import torch
from helpers import peft_adapter

from lora_lego import load_adapter, merge
from lora_lego.errors import LoraLegoError
from lora_lego.integrations.peft import merge_peft_adapters


@pytest.fixture
def loaded(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = peft_adapter(tiny_base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    b = peft_adapter(tiny_base, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_rslora=True, rank_pattern={"v_proj": 2})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    return model, a, b


def layer_deltas(model, name):
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(name).float() for n, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def test_concat_into_a_new_adapter_is_the_weighted_sum(loaded):
    model, _, _ = loaded
    merge_peft_adapters(model, ["a", "b"], "sum", method="concat", weights=[0.5, -1.0])
    da, db, ds = layer_deltas(model, "a"), layer_deltas(model, "b"), layer_deltas(model, "sum")
    assert set(ds) == set(da)
    for n in ds:
        assert torch.allclose(ds[n], 0.5 * da[n] - db[n], atol=1e-5), n
    assert model.active_adapters == ["a"]
    model.set_adapter("sum")
    model(torch.tensor([[1, 2, 3]]))  # the new adapter runs


def test_lego_in_memory_equals_lego_on_the_files(loaded):
    model, a, b = loaded
    result = merge_peft_adapters(model, ["a", "b"], "lego3", method="lego", rank=3, seed=5, param_reweight="halves")
    on_files = merge([load_adapter(a), load_adapter(b)], method="lego", rank=3, seed=5, param_reweight="halves")
    deltas = layer_deltas(model, "lego3")
    for n in on_files.modules:
        assert torch.allclose(result.factors(n).delta(), on_files.factors(n).delta(), atol=1e-6), n
        assert torch.allclose(deltas[n], on_files.factors(n).delta(), atol=1e-5), n
        assert model.base_model.model.get_submodule(n).lora_A["lego3"].weight.shape[0] == 3


def test_bad_names_are_refused(loaded):
    model, _, _ = loaded
    with pytest.raises(LoraLegoError, match="no adapter named 'c'"):
        merge_peft_adapters(model, ["a", "c"], "m")
    with pytest.raises(LoraLegoError, match="already has an adapter named 'b'"):
        merge_peft_adapters(model, ["a"], "b")
