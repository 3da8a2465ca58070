"""Module names across conventions: PEFT's dotted paths, diffusers' component-prefixed dotted paths, and kohya's
underscored names, which drop the dots and so need a vocabulary to get them back.

Inside lora-lego a Stable Diffusion module is named the diffusers way, ``<component>.<dotted path>``
(``unet.down_blocks.0.attentions.0.proj_in``); a PEFT module by its dotted path alone
(``model.layers.0.self_attn.q_proj``)."""

from __future__ import annotations

import re

from ..errors import LoraLegoError

# Components of a diffusers pipeline that LoRA files name.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")

# kohya prefix (without the trailing "_") -> component
KOHYA_PREFIXES = {
    "lora_unet": "unet",
    "lora_transformer": "transformer",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_prior_unet": "prior",
}
_KOHYA_NAME = re.compile(r"^(lora_prior_unet|lora_unet|lora_transformer|lora_te\d?)_(.+)$")

# Identifiers with an underscore inside, as diffusers (UNet2DConditionModel, SD3/Flux transformers) and
# transformers (CLIP, T5) name their submodules; kohya's names join them with "_" like everything else.
_DIFFUSERS_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
    "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj",
    "to_add_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj", "norm_out", "ff_context",
    "norm1_context", "proj_mlp", "context_embedder", "x_embedder", "time_text_embed", "timestep_embedder",
    "guidance_embedder", "text_embedder", "pos_embed", "norm_q", "norm_k", "norm_added_q", "norm_added_k",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "token_embedding", "position_embedding", "text_projection", "wi_0", "wi_1",
    "relative_attention_bias",
}
_PLAIN_WORDS = {
    "attentions", "resnets", "downsamplers", "upsamplers", "attn", "attn1", "attn2", "ff", "net", "proj",
    "conv", "conv1", "conv2", "norm", "norm1", "norm2", "norm3", "linear", "encoder", "layers", "mlp", "fc1",
    "fc2", "embeddings", "block", "layer", "SelfAttention", "EncDecAttention", "DenseReluDense", "q", "k",
    "v", "o", "wi", "wo", "shared", "emb", "time", "context",
}
# Original (LDM) names that kohya uses for SDXL; kept as words so that names read back consistently, but
# diffusers lays these blocks out differently, so they cannot be converted by renaming.
_LDM_WORDS = {"input_blocks", "middle_block", "output_blocks", "emb_layers", "in_layers", "out_layers",
              "skip_connection", "time_embed", "label_emb"}
# Flux's original (BFL) names, which kohya uses for Flux; diffusers splits these modules differently.
_BFL_WORDS = {"double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod",
              "txt_mod", "final_layer", "time_in", "vector_in", "guidance_in", "txt_in", "img_in"}
_MULTI = {w for w in _DIFFUSERS_WORDS | _LDM_WORDS | _BFL_WORDS if "_" in w}
_MAX_PARTS = max(w.count("_") + 1 for w in _MULTI)
KNOWN_WORDS = _DIFFUSERS_WORDS | _PLAIN_WORDS


def dotify(underscored: str) -> str:
    """kohya's ``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``: split on
    "_", then rejoin the longest runs that form a known identifier. Replacing every "." of the result with
    "_" gives the input back exactly, whatever the vocabulary knows."""
    tokens = underscored.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _MAX_PARTS), i + 1, -1):
            if "_".join(tokens[i:j]) in _MULTI:
                parts.append("_".join(tokens[i:j]))
                i = j
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def split_component(name: str) -> tuple[str | None, str]:
    """``unet.down_blocks.0...`` -> ("unet", "down_blocks.0..."); a name without a known component -> (None, name)."""
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, name


def kohya_to_canonical(lora_name: str, path: object) -> tuple[str, str]:
    """A kohya module name -> (canonical name, kohya prefix)."""
    m = _KOHYA_NAME.match(lora_name)
    if m is None or m.group(1) not in KOHYA_PREFIXES:
        raise LoraLegoError(f"kohya module name {lora_name!r} has no known prefix "
                            f"({', '.join(p + '_' for p in KOHYA_PREFIXES)})", path=path)
    return f"{KOHYA_PREFIXES[m.group(1)]}.{dotify(m.group(2))}", m.group(1)


def canonical_to_kohya(name: str, prefixes: dict[str, str]) -> str:
    """A canonical name (with its component) -> kohya's module name. ``prefixes`` maps a component to the
    prefix to use for it (the one an input used); defaults otherwise."""
    component, rest = split_component(name)
    if component is None:
        raise ValueError(name)
    prefix = prefixes.get(component) or {"unet": "lora_unet", "transformer": "lora_transformer",
                                         "text_encoder": "lora_te", "text_encoder_2": "lora_te2",
                                         "text_encoder_3": "lora_te3", "prior": "lora_prior_unet"}[component]
    return f"{prefix}_{rest.replace('.', '_')}"


def unknown_words(name: str) -> list[str]:
    """The parts of a dotted path that are neither numbers nor identifiers the kohya vocabulary knows: where a
    name read from kohya may have been split wrongly, or uses a layout diffusers does not."""
    return [p for p in name.split(".") if not p.isdigit() and p not in KNOWN_WORDS]


_UNET_TOP = {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding"}
_TRANSFORMER_TOP = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                    "time_text_embed", "proj_out", "norm_out", "pos_embed"}


def infer_component(names) -> str | None:
    """The pipeline component that a PEFT adapter's module names belong to, when their first part says it:
    a UNet's down/mid/up blocks, a diffusion transformer's blocks, a CLIP text model. None otherwise."""
    tops = {n.split(".", 1)[0] for n in names}
    if not tops:
        return None
    if tops <= _UNET_TOP:
        return "unet"
    if tops <= _TRANSFORMER_TOP:
        return "transformer"
    if tops == {"text_model"}:
        return "text_encoder"
    return None


# Leaf names of fused and of split attention projections.
_FUSED_QKV = re.compile(r"(^|_)(qkv|to_qkv|qkv_proj|Wqkv|query_key_value)($|_)|^c_attn$", re.IGNORECASE)
_SPLIT_Q = {"q_proj", "to_q", "q", "query", "add_q_proj", "wq"}


def qkv_layout(names) -> tuple[str | None, str | None]:
    """(a module with a fused q/k/v projection, a module with a split q projection), each None if absent."""
    fused = split = None
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if fused is None and _FUSED_QKV.search(leaf):
            fused = n
        elif split is None and leaf in _SPLIT_Q:
            split = n
    return fused, split


def check_qkv_layouts(adapters) -> None:
    """Refuse to merge an adapter whose attention is fused (one qkv module) with one whose attention is split
    (q, k, v modules): their units live in different spaces and the module names never meet."""
    layouts = []
    for a in adapters:
        fused, split = qkv_layout(a.modules)
        if fused is not None and split is None:
            layouts.append(("fused", a, fused))
        elif split is not None and fused is None:
            layouts.append(("split", a, split))
    kinds = {k for k, _, _ in layouts}
    if kinds == {"fused", "split"}:
        f = next(x for x in layouts if x[0] == "fused")
        s = next(x for x in layouts if x[0] == "split")
        raise LoraLegoError(
            f"has a fused qkv module ({f[2]}) but {s[1].label} has split q/k/v modules (e.g. {s[2]}); "
            "they were trained on differently built models (or one was converted) and cannot be merged unit by "
            "unit", path=f[1].label)
