"""Tell a single-file adapter's format from its tensor names, and refuse what lora-lego does not merge."""

from __future__ import annotations

from ..errors import LoraLegoError

# marker in a tensor name -> what the file holds. Checked first, so that a LyCORIS or DoRA file is named
# for what it is rather than called "not a LoRA".
REFUSED_MARKERS = [
    ("hada_w", "LoHa (LyCORIS hada_w1_a/hada_w2_b)"),
    ("lokr_w", "LoKr (LyCORIS lokr_w1/lokr_w2)"),
    ("lora_mid", "LoCon with a Tucker core (LyCORIS lora_mid)"),
    ("oft_blocks", "OFT (oft_blocks)"),
    ("oft_diag", "OFT (oft_diag)"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".lora_B.bias", "a LoRA bias (lora_B.bias)"),
    (".lora_up.bias", "a LoRA bias (lora_up.bias)"),
    (".lora_A.bias", "a LoRA bias (lora_A.bias)"),
    (".lora_down.bias", "a LoRA bias (lora_down.bias)"),
]


def refuse_unsupported(keys, path: object) -> None:
    for key in keys:
        for marker, what in REFUSED_MARKERS:
            if marker in key:
                module = key.split(".")[0] if "." in key else key
                raise LoraLegoError(f"holds {what} at {key}; lora-lego merges plain LoRA factors only "
                                    f"(module {module})", path=path)


def detect_format(keys, path: object) -> str:
    """"kohya" (``<name>.lora_down.weight``), "diffusers" (``<component>.<path>.lora_A.weight``) or "peft"
    (``base_model.model.<path>.lora_A.weight``, weights without their adapter_config.json)."""
    keys = list(keys)
    refuse_unsupported(keys, path)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    lora_ab = [k for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if lora_ab:
        if all(k.startswith("base_model.model.") for k in lora_ab):
            return "peft"
        return "diffusers"
    if not keys:
        raise LoraLegoError("holds no tensors", path=path)
    raise LoraLegoError(f"is not a recognised LoRA file: no lora_down/lora_up (kohya) or lora_A/lora_B "
                        f"(diffusers) tensors (first key: {keys[0]})", path=path)
