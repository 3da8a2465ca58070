import pytest
import torch
from helpers import random_modules, write_peft

from lora_lego import load_adapter, merge
from lora_lego.errors import LoraLegoError


def test_ensemble_is_the_exact_mean_of_the_updates(tmp_path):
    mods = [random_modules(r, s) for s, r in enumerate((2, 4, 3))]
    paths = [write_peft(tmp_path / f"a{i}", m, r=m[next(iter(m))][0].shape[0], alpha=2.0 * (i + 1))
             for i, m in enumerate(mods)]
    adapters = [load_adapter(p) for p in paths]
    merged = merge(adapters, method="ensemble")
    for name in mods[0]:
        expected = sum(a.factors(name).delta() for a in adapters) / 3
        assert merged.modules[name].rank == 9
        assert torch.allclose(merged.factors(name).delta(), expected, atol=1e-6)
    with pytest.raises(LoraLegoError, match="--rank does not apply to ensemble"):
        merge(adapters, method="ensemble", rank=4)
