"""Reading and writing PEFT adapters, checked against PEFT itself on a tiny random model."""

import json

import pytest
import torch
from helpers import peft_adapter, peft_deltas, random_modules, write_peft

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.errors import LoraLegoError
from lora_lego.formats.peft import get_pattern_key


def our_deltas(adapter):
    return {name: adapter.factors(name).delta() for name in adapter.modules}


def assert_same_deltas(ours, peft, atol=1e-5):
    assert set(ours) == set(peft), (sorted(ours), sorted(peft))
    for name, d in ours.items():
        ref = peft[name]
        assert d.shape == ref.shape, name
        assert torch.allclose(d, ref, atol=atol, rtol=1e-4), (name, (d - ref).abs().max())


def test_read_matches_peft_with_rank_alpha_patterns_and_rslora(tiny_base, tmp_path):
    path = peft_adapter(tiny_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, use_rslora=True,
                        rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    adapter = load_adapter(path)
    specs = adapter.modules
    assert specs["model.layers.0.mlp.down_proj"].rank == 6
    assert specs["model.layers.1.self_attn.q_proj"].alpha == 3
    assert specs["model.layers.1.self_attn.q_proj"].scale == pytest.approx(3 / 2)  # rsLoRA: alpha/sqrt(r)
    assert_same_deltas(our_deltas(adapter), peft_deltas(tiny_base, path))


def test_merge_round_trips_through_peft(tiny_base, tmp_path):
    """Heterogeneous ranks and alphas merged by lego: PEFT's merge_and_unload of what we wrote gives our ΔW."""
    a = peft_adapter(tiny_base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    b = peft_adapter(tiny_base, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                     rank_pattern={"v_proj": 2})
    merged = merge([load_adapter(a), load_adapter(b)], method="lego", seed=0)
    ranks = {n: s.rank for n, s in merged.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.0.self_attn.v_proj"] == 4
    save_adapter(merged, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and set(cfg["rank_pattern"].values()) == {4}
    assert cfg["base_model_name_or_path"] == str(tiny_base)
    assert_same_deltas(our_deltas(merged), peft_deltas(tiny_base, tmp_path / "out"))


def test_concat_round_trip_equals_sum_of_peft_deltas(tiny_base, tmp_path):
    a = peft_adapter(tiny_base, tmp_path / "a", seed=1)
    b = peft_adapter(tiny_base, tmp_path / "b", seed=2, r=2, lora_alpha=16)
    save_adapter(merge([load_adapter(a), load_adapter(b)], method="concat", weights=[0.5, -1.0]), tmp_path / "out")
    da, db, dout = (peft_deltas(tiny_base, p) for p in (a, b, tmp_path / "out"))
    assert_same_deltas(dout, {k: 0.5 * da[k] - db[k] for k in da})


def test_fan_in_fan_out_gpt2(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                          init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    ad = load_adapter(tmp_path / "a")
    save_adapter(merge([ad, ad], method="concat", weights=[1.0, 1.0]), tmp_path / "out")
    from peft import PeftModel

    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().clone()
    w1 = PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload().transformer.h[0].attn.c_attn.weight
    # Conv1D stores (in, out): the update is the transpose of B @ A
    expected = 2 * ad.factors("transformer.h.0.attn.c_attn").delta().T
    assert torch.allclose(w1 - w0, expected, atol=1e-5)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_get_pattern_key_follows_peft_rule():
    keys = ["down_proj", "layers.1.self_attn.q_proj"]
    assert get_pattern_key(keys, "model.layers.0.mlp.down_proj") == "down_proj"
    assert get_pattern_key(keys, "model.layers.1.self_attn.q_proj") == "layers.1.self_attn.q_proj"
    assert get_pattern_key(keys, "model.layers.11.self_attn.q_proj") is None
    assert get_pattern_key(keys, "model.layers.0.mlp.xdown_proj") is None


def test_dtype_is_kept_and_legacy_bin_is_read(tmp_path):
    mods = random_modules(4, 0)
    write_peft(tmp_path / "h", mods, r=4, alpha=8, dtype=torch.float16)
    ad = load_adapter(tmp_path / "h")
    assert ad.dtype == torch.float16
    assert save_adapter(ad, tmp_path / "out") == torch.float16
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # legacy adapter_model.bin
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((tmp_path / "h" / "adapter_config.json").read_text())
    torch.save({f"base_model.model.{n}.lora_{r}.weight": t for n, (A, B) in mods.items() for r, t in (("A", A), ("B", B))},
               legacy / "adapter_model.bin")
    lg = load_adapter(legacy)
    for name in mods:
        assert torch.allclose(lg.factors(name).delta(), 2.0 * mods[name][1] @ mods[name][0], atol=1e-6)


def test_fp16_overflow_is_stored_in_float32_with_a_warning(tmp_path):
    mods = {"m.q": (torch.full((1, 4), 300.0), torch.full((4, 1), 300.0))}
    write_peft(tmp_path / "h", mods, r=1, alpha=1, dtype=torch.float16)
    warnings = []
    merged = merge([load_adapter(tmp_path / "h")] * 2, method="concat")
    merged.factors("m.q").B.mul_(1000)  # 300000 > 65504
    dtype = save_adapter(merged, tmp_path / "out", warn=warnings.append)
    assert dtype == torch.float32 and "float32" in warnings[0]


def test_rank_mismatch_with_config_is_refused(tmp_path):
    write_peft(tmp_path / "bad", random_modules(4, 0), r=8, alpha=8)
    with pytest.raises(LoraLegoError, match="rank 4 but adapter_config.json gives r=8"):
        load_adapter(tmp_path / "bad")


def test_dora_and_non_lora_tensors_are_refused(tmp_path):
    write_peft(tmp_path / "d", random_modules(2, 0), r=2, alpha=2, use_dora=True)
    with pytest.raises(LoraLegoError, match="DoRA"):
        load_adapter(tmp_path / "d")
    from safetensors.torch import save_file

    p = write_peft(tmp_path / "m", random_modules(2, 0), r=2, alpha=2)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(24, 2),
               "base_model.model.score.modules_to_save.default.weight": torch.zeros(3, 24)},
              str(p / "adapter_model.safetensors"))
    with pytest.raises(LoraLegoError, match="not LoRA factors"):
        load_adapter(p)
