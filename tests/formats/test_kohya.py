"""kohya files: read, round trip, merge, and what diffusers' own kohya loader makes of what we write."""

import json

import pytest
import torch
from helpers import flat_delta, merged_unet_deltas, tiny_unet, unet_lora, write_kohya
from safetensors import safe_open
from safetensors.torch import save_file

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.errors import LoraLegoError

diffusers = pytest.importorskip("diffusers")


def delta_of(adapter, name):
    spec = adapter.modules[name]
    return adapter.factors(name).delta().reshape(spec.b_shape[0], *spec.a_shape[1:])


def diffusers_kohya_deltas(path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    def load(unet):
        sd, alphas = Loader.lora_state_dict(str(path))
        Loader.load_lora_into_unet(sd, alphas, unet, adapter_name="x")

    return merged_unet_deltas(tiny_unet, load)


def test_read_linear_and_conv_with_and_without_alpha(tmp_path):
    mods = unet_lora(tiny_unet(), 4, seed=0)
    ad = load_adapter(write_kohya(tmp_path / "a.safetensors", mods, alpha=2.0))
    assert ad.format == "kohya"
    assert set(ad.modules) == {f"unet.{n}" for n in mods}
    conv = ad.modules["unet.mid_block.resnets.0.conv1"]
    assert conv.kind == "conv" and conv.a_shape == (4, 16, 3, 3) and conv.d_in == 16 * 9
    assert conv.alpha == 2.0 and conv.scale == 0.5
    for name, (down, up) in mods.items():
        assert torch.allclose(delta_of(ad, f"unet.{name}"), 0.5 * flat_delta(down, up), atol=1e-6)
    # alpha missing (old kohya files) means alpha = rank: scale 1
    ad = load_adapter(write_kohya(tmp_path / "b.safetensors", mods, alpha=None))
    name = "down_blocks.0.attentions.0.proj_in"
    assert ad.modules[f"unet.{name}"].scale == 1.0
    assert torch.allclose(delta_of(ad, f"unet.{name}"), flat_delta(*mods[name]), atol=1e-6)


def test_our_reading_matches_diffusers_kohya_loader(tmp_path):
    mods = unet_lora(tiny_unet(), 4, seed=1)
    path = write_kohya(tmp_path / "a.safetensors", mods, alpha=3.0)
    ours, ref = load_adapter(path), diffusers_kohya_deltas(path)
    assert set(ref) == set(mods)
    for name in mods:
        assert torch.allclose(delta_of(ours, f"unet.{name}"), ref[name], atol=1e-5), name


def test_round_trip_keeps_names_shapes_metadata(tmp_path):
    mods = unet_lora(tiny_unet(), 4, seed=0)
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1",
            "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2"}), "sshs_model_hash": "abc",
            "ss_output_name": "style"}
    src = write_kohya(tmp_path / "a.safetensors", mods, alpha=2.0, metadata=meta, dtype=torch.float16)
    ad = load_adapter(src)
    assert save_adapter(ad, tmp_path / "out.safetensors") == torch.float16
    with safe_open(str(src), "pt") as f:
        keys_in = set(f.keys())
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert set(f.keys()) == keys_in
        out_meta = f.metadata()
        assert f.get_tensor("lora_unet_mid_block_resnets_0_conv1.lora_down.weight").shape == (4, 16, 3, 3)
        assert f.get_tensor("lora_unet_mid_block_resnets_0_conv1.lora_up.weight").shape == (16, 4, 1, 1)
        assert float(f.get_tensor("lora_unet_mid_block_resnets_0_conv1.alpha")) == 4.0  # alpha = rank
    assert out_meta["ss_base_model_version"] == "sd_v1" and out_meta["ss_output_name"] == "style"
    assert out_meta["ss_network_dim"] == "4" and out_meta["ss_network_alpha"] == "4.0"
    assert json.loads(out_meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert "sshs_model_hash" not in out_meta  # hashed the old tensors
    back = load_adapter(tmp_path / "out.safetensors")
    for name in ad.modules:
        assert torch.allclose(delta_of(back, name), delta_of(ad, name), atol=2e-3, rtol=1e-2)


def test_merge_written_as_kohya_loads_in_diffusers_with_our_delta(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors", unet_lora(tiny_unet(), 4, seed=0), alpha=2.0)
    b = write_kohya(tmp_path / "b.safetensors", unet_lora(tiny_unet(), 6, seed=1), alpha=6.0)
    merged = merge([load_adapter(a), load_adapter(b)], method="lego", rank=3, seed=0)
    assert merged.format == "kohya"
    save_adapter(merged, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "3" and "lora_lego" in f.metadata()
    ref = diffusers_kohya_deltas(tmp_path / "m.safetensors")
    for name in merged.modules:
        assert torch.allclose(delta_of(merged, name), ref[name.removeprefix("unet.")], atol=1e-5), name


def test_text_encoder_prefixes_are_kept(tmp_path):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    for prefixes in (["lora_te"], ["lora_te1", "lora_te2"]):
        tensors = {}
        for p in prefixes:
            k = f"{p}_text_model_encoder_layers_0_self_attn_q_proj"
            tensors.update({f"{k}.lora_down.weight": A.clone(), f"{k}.lora_up.weight": B.clone(), f"{k}.alpha": torch.tensor(2.0)})
        src = tmp_path / f"{prefixes[0]}.safetensors"
        save_file(tensors, str(src))
        ad = load_adapter(src)
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in ad.modules
        out = tmp_path / f"out-{prefixes[0]}.safetensors"
        save_adapter(ad, out)
        with safe_open(str(out), "pt") as f:
            assert set(f.keys()) == set(tensors)


@pytest.mark.parametrize("key, message", [
    ("lora_unet_x.hada_w1_a", "LoHa"),
    ("lora_unet_x.lokr_w1", "LoKr"),
    ("lora_unet_x.dora_scale", "DoRA"),
    ("lora_unet_x.lora_up.bias", "LoRA bias"),
    ("lora_unet_x.lora_mid.weight", "Tucker"),
    ("bundle_emb.x.string_to_param.*", "not kohya LoRA factors"),
])
def test_unsupported_kinds_are_refused_by_name(tmp_path, key, message):
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               key: torch.zeros(2)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    with pytest.raises(LoraLegoError, match=message) as e:
        load_adapter(tmp_path / "a.safetensors")
    assert "\n" not in str(e.value) and "a.safetensors" in str(e.value)


def test_missing_half_and_bad_alpha_are_refused(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(LoraLegoError, match="lora_up missing"):
        load_adapter(tmp_path / "a.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_x.alpha": torch.tensor(float("nan"))}, str(tmp_path / "b.safetensors"))
    with pytest.raises(LoraLegoError, match="alpha must be a finite number"):
        load_adapter(tmp_path / "b.safetensors")
