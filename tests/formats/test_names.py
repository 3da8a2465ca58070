"""Module names across conventions."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_lego.errors import LoraLegoError
from lora_lego.formats.names import (canonical_to_kohya, dotify, infer_component, kohya_to_canonical, qkv_layout,
                                     unknown_words)


@pytest.mark.parametrize("kohya, canonical", [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_mid_block_resnets_0_time_emb_proj", "unet.mid_block.resnets.0.time_emb_proj"),
    ("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
     "unet.up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc2", "text_encoder_2.text_model.encoder.layers.0.mlp.fc2"),
    ("lora_unet_single_transformer_blocks_3_proj_mlp", "unet.single_transformer_blocks.3.proj_mlp"),
])
def test_kohya_names_get_their_dots_back(kohya, canonical):
    name, prefix = kohya_to_canonical(kohya, "f")
    assert name == canonical and unknown_words(name.split(".", 1)[1]) == []
    assert canonical_to_kohya(name, {"text_encoder": prefix}) == kohya


@given(st.lists(st.sampled_from(["down", "blocks", "to", "q", "0", "12", "proj", "in", "attn1", "x", "out"]),
                min_size=1, max_size=12))
def test_dotify_only_turns_underscores_into_dots(tokens):
    s = "_".join(tokens)
    assert dotify(s).replace(".", "_") == s


def test_layouts_that_diffusers_does_not_share_are_flagged():
    assert unknown_words(dotify("input_blocks_4_1_transformer_blocks_0_attn1_to_q")) == ["input_blocks"]
    assert "img_attn" in unknown_words(dotify("double_blocks_0_img_attn_qkv"))
    with pytest.raises(LoraLegoError, match="no known prefix"):
        kohya_to_canonical("lycoris_foo_bar", "f")


def test_component_inference_and_qkv_layout():
    assert infer_component(["down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1"]) == "unet"
    assert infer_component(["transformer_blocks.0.attn.to_q"]) == "transformer"
    assert infer_component(["text_model.encoder.layers.0.self_attn.q_proj"]) == "text_encoder"
    assert infer_component(["model.layers.0.self_attn.q_proj"]) is None
    assert qkv_layout(["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"]) == \
        ("model.layers.0.self_attn.qkv_proj", None)
    assert qkv_layout(["transformer.h.0.attn.c_attn"])[0] is not None
    assert qkv_layout(["model.layers.0.self_attn.q_proj"]) == (None, "model.layers.0.self_attn.q_proj")
