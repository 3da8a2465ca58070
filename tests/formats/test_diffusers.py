"""diffusers files and conversion between formats, checked against diffusers and PEFT loading what we write."""

import json

import pytest
import torch
from helpers import UNET_TARGETS, merged_unet_deltas, random_adapter, tiny_unet, unet_lora, write_kohya
from safetensors import safe_open
from safetensors.torch import save_file

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.errors import LoraLegoError
from lora_lego.formats import convert
from lora_lego.formats.detect import detect_format

pytest.importorskip("diffusers")


def delta_of(adapter, name):
    spec = adapter.modules[name]
    return adapter.factors(name).delta().reshape(spec.b_shape[0], *spec.a_shape[1:])


def peft_unet(seed, r=4, alpha=8, **kw):
    """A tiny UNet with a real PEFT LoRA (random A and B) on UNET_TARGETS."""
    from peft import LoraConfig

    unet = tiny_unet()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(UNET_TARGETS), init_lora_weights=False, **kw))
    return unet


def lora_deltas(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, BaseTunerLayer):
            out[name] = m.get_delta_weight(m.active_adapters[0]).float()
    return out


def test_reads_what_diffusers_writes_with_its_metadata(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from peft.utils import get_peft_model_state_dict

    unet = peft_unet(seed=0, r=4, alpha=8, rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 6})
    meta = unet.peft_config["default"].to_dict()
    Loader.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=meta)
    ad = load_adapter(tmp_path)  # a folder holding pytorch_lora_weights.safetensors
    assert ad.format == "diffusers"
    conv = ad.modules["unet.mid_block.resnets.0.conv1"]
    assert conv.rank == 2 and conv.alpha == 6 and conv.scale == 3
    ref = lora_deltas(unet)
    assert {f"unet.{n}" for n in ref} == set(ad.modules)
    for name, d in ref.items():
        assert torch.allclose(delta_of(ad, f"unet.{name}"), d, atol=1e-5), name


def test_merge_written_as_diffusers_loads_with_our_delta(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors", unet_lora(tiny_unet(), 4, seed=0), alpha=2.0)
    b = write_kohya(tmp_path / "b.safetensors", unet_lora(tiny_unet(), 2, seed=1), alpha=1.0)
    merged = merge([load_adapter(a), load_adapter(b)], method="lego", rank=3, seed=0)
    save_adapter(merged, tmp_path / "m.safetensors", format="diffusers")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.down_blocks") or k.startswith("unet.mid") or k.startswith("unet.up")
                   for k in f.keys())
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 3
    ref = merged_unet_deltas(tiny_unet, lambda u: u.load_lora_adapter(str(tmp_path / "m.safetensors"), prefix="unet"))
    assert len(ref) == len(merged.modules)
    for name in merged.modules:
        assert torch.allclose(delta_of(merged, name), ref[name.removeprefix("unet.")], atol=1e-5), name
    # and back: reading our diffusers file gives the same ΔW
    back = load_adapter(tmp_path / "m.safetensors")
    for name in merged.modules:
        assert torch.allclose(delta_of(back, name), delta_of(merged, name), atol=1e-6)


def test_ranks_that_differ_per_module_load_in_diffusers(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors", unet_lora(tiny_unet(), 4, seed=0), alpha=2.0)
    b = write_kohya(tmp_path / "b.safetensors", unet_lora(tiny_unet(), 2, seed=1, targets=UNET_TARGETS[:3]), alpha=1.0)
    merged = merge([load_adapter(a), load_adapter(b)], method="concat")  # rank 6 where both are, 4 elsewhere
    assert {s.rank for s in merged.modules.values()} == {4, 6}
    save_adapter(merged, tmp_path / "m.safetensors", format="diffusers")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and set(meta["unet.rank_pattern"].values()) == {6}
    ref = merged_unet_deltas(tiny_unet, lambda u: u.load_lora_adapter(str(tmp_path / "m.safetensors"), prefix="unet"))
    for name in merged.modules:
        assert torch.allclose(delta_of(merged, name), ref[name.removeprefix("unet.")], atol=1e-5), name


def test_peft_unet_adapter_converts_to_kohya_and_diffusers_and_back(tmp_path):
    from peft import get_peft_model, LoraConfig

    unet = tiny_unet()
    torch.manual_seed(3)
    pm = get_peft_model(unet, LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGETS), init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    ad = load_adapter(tmp_path / "peft")
    save_adapter(ad, tmp_path / "k.safetensors", format="kohya")
    save_adapter(ad, tmp_path / "d.safetensors", format="diffusers")
    k, d = load_adapter(tmp_path / "k.safetensors"), load_adapter(tmp_path / "d.safetensors")
    assert k.format == "kohya" and d.format == "diffusers" and set(k.modules) == set(d.modules)
    for name in ad.modules:
        assert torch.allclose(delta_of(k, f"unet.{name}"), delta_of(ad, name), atol=1e-6)
        assert torch.allclose(delta_of(d, f"unet.{name}"), delta_of(ad, name), atol=1e-6)
    # kohya -> peft: PEFT itself loads it into the UNet with the same ΔW
    save_adapter(k, tmp_path / "peft2", format="peft")
    from peft import PeftModel

    again = PeftModel.from_pretrained(tiny_unet(), tmp_path / "peft2")
    ref = lora_deltas(again.base_model.model)
    for name in ad.modules:
        assert torch.allclose(ref[name], delta_of(ad, name), atol=1e-5), name


def test_format_detection_from_keys(tmp_path):
    assert detect_format(["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"], "f") == "kohya"
    assert detect_format(["unet.a.lora_A.weight", "unet.a.lora_B.weight"], "f") == "diffusers"
    assert detect_format(["base_model.model.a.lora_A.weight"], "f") == "peft"
    with pytest.raises(LoraLegoError, match="LoKr"):
        detect_format(["lora_unet_a.lokr_w1"], "f")
    with pytest.raises(LoraLegoError, match="not a recognised LoRA file"):
        detect_format(["model.weight"], "f")


def test_conversions_the_names_do_not_allow_are_refused(tmp_path):
    # SDXL's original layout in kohya names: no safe diffusers name
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(2, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(8, 2)}, str(tmp_path / "x.safetensors"))
    sdxl = load_adapter(tmp_path / "x.safetensors")
    assert "unet.input_blocks.4.1.proj_in" in sdxl.modules
    with pytest.raises(LoraLegoError, match="input_blocks"):
        save_adapter(sdxl, tmp_path / "x-d.safetensors", format="diffusers")
    # an LLM adapter has no pipeline component
    llm = load_adapter(random_adapter(tmp_path / "llm"))
    with pytest.raises(LoraLegoError, match="which diffusion pipeline component"):
        convert(llm, "kohya")
    # a unet + text encoder file is not one PEFT adapter
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2)},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(LoraLegoError, match="several pipeline components"):
        save_adapter(load_adapter(tmp_path / "two.safetensors"), tmp_path / "two-peft", format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm", "two.safetensors", "x.safetensors"]


def test_fused_qkv_meeting_split_qkv_is_refused(tmp_path):
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2)},
              str(tmp_path / "flux-kohya.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2)},
              str(tmp_path / "flux-diffusers.safetensors"))
    a, b = load_adapter(tmp_path / "flux-kohya.safetensors"), load_adapter(tmp_path / "flux-diffusers.safetensors")
    with pytest.raises(LoraLegoError, match="fused qkv module .*split q/k/v"):
        merge([a, b])
    merge([a, a])  # same layout: fine


def test_dora_and_bias_in_diffusers_files_are_refused(tmp_path):
    for extra, message in (("unet.a.lora_magnitude_vector", "DoRA"), ("unet.a.lora_B.bias", "LoRA bias")):
        save_file({"unet.a.lora_A.weight": torch.randn(2, 8), "unet.a.lora_B.weight": torch.randn(8, 2),
                   extra: torch.randn(8)}, str(tmp_path / "d.safetensors"))
        with pytest.raises(LoraLegoError, match=message):
            load_adapter(tmp_path / "d.safetensors")


def test_kohya_and_diffusers_inputs_merge_module_by_module(tmp_path):
    """The same UNet's LoRAs in both formats meet under the same names; the output takes the first's format."""
    mods = unet_lora(tiny_unet(), 4, seed=0)
    k = load_adapter(write_kohya(tmp_path / "k.safetensors", mods, alpha=4.0))
    save_adapter(k, tmp_path / "d.safetensors", format="diffusers")
    d = load_adapter(tmp_path / "d.safetensors")
    merged = merge([k, d], method="concat", weights=[1.0, -1.0])
    assert merged.format == "kohya" and set(merged.modules) == set(k.modules)
    for name in merged.modules:  # x - x = 0, module by module
        assert delta_of(merged, name).abs().max() < 1e-6
