"""PEFT's naming and scaling rules, without torch: shared by the PEFT and diffusers readers and by the
CLI's Gram prefetch (``prefetch.py``), which runs before torch is imported."""

from __future__ import annotations

import math
import re
from typing import Any

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# the linear factors' key suffixes (embeddings and conv LoRAs have others; the readers know them)
LINEAR_A_SUFFIX = ".lora_A.weight"
LINEAR_B_SUFFIX = ".lora_B.weight"


def get_pattern_key(pattern_keys, name: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of the module
    name on a dot boundary, the key read as a regular expression."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def module_rank_alpha(config: dict[str, Any], name: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT would give this module, honouring rank_pattern and alpha_pattern."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = get_pattern_key(rank_pattern.keys(), name)
    a_key = get_pattern_key(alpha_pattern.keys(), name)
    r = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


