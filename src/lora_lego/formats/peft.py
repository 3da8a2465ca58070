"""PEFT adapter directories: adapter_config.json with adapter_model.safetensors (or legacy .bin)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, Factors, ModuleSpec
from ..errors import LoraLegoError
from ..peft_rules import (  # noqa: F401 (get_pattern_key, lora_scale, module_rank_alpha re-exported)
    CONFIG_NAME, LINEAR_A_SUFFIX, LINEAR_B_SUFFIX, PREFIX, SAFETENSORS_NAME, get_pattern_key, lora_scale, module_rank_alpha,
)
from .tensors import TensorSource, check_finite

BIN_NAME = "adapter_model.bin"

# suffix -> (role, kind)
_SUFFIXES = {
    LINEAR_A_SUFFIX: ("A", "linear"),
    LINEAR_B_SUFFIX: ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
# markers of adapters we refuse, with what to call them
_REFUSED = [
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".lora_B.bias", "a LoRA bias (lora_B.bias)"),
    (".lora_A.bias", "a LoRA bias (lora_A.bias)"),
    ("hada_w1", "LoHa (hada_w1_a)"),
    ("lokr_w1", "LoKr (lokr_w1)"),
    ("lora_E", "AdaLoRA (lora_E)"),
]


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraLegoError(f"no {CONFIG_NAME} in this folder: not a PEFT adapter", path=path) from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        raise LoraLegoError(f"invalid JSON ({_one_line(e)})", path=cfg_path) from None
    except OSError as e:
        raise LoraLegoError(f"cannot read ({e.strerror or e})", path=cfg_path) from None
    if not isinstance(config, dict):
        raise LoraLegoError("expected a JSON object", path=cfg_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraLegoError(f"peft_type is {peft_type}; lora-lego merges LoRA adapters only", path=cfg_path)
    if config.get("use_dora"):
        raise LoraLegoError("use_dora is true: DoRA adapters are not supported (their magnitude vector "
                            "does not merge by clustering rank units)", path=cfg_path)
    for key, whole in (("r", True), ("lora_alpha", False)):
        _check_number(config.get(key, 8), key, whole, cfg_path)
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise LoraLegoError(f"{key} must be an object, got {type(value).__name__}", path=cfg_path)
        for k, v in value.items():
            _check_number(v, f"{key}[{_one_line(k)}]", whole, cfg_path)
            try:
                re.compile(rf"(.*\.)?({k})$")  # as get_pattern_key uses it
            except (re.error, RecursionError, OverflowError) as e:
                raise LoraLegoError(f"{key} key {_one_line(k)} is not a valid pattern ({_one_line(e)})", path=cfg_path) from None
    target = config.get("target_modules")
    if not (target is None or isinstance(target, str) or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise LoraLegoError(f"target_modules must be a string or a list of strings, got {_one_line(target)}", path=cfg_path)
    return config


def _check_number(value: Any, key: str, whole: bool, cfg_path: Path) -> None:
    """r and rank_pattern values: whole numbers >= 1; lora_alpha and alpha_pattern values: finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif isinstance(value, int):
        ok = 0 < value < 2**31  # a Python int may be too large for a float
    else:
        ok = math.isfinite(value) and value > 0 and (value.is_integer() or not whole)
    if not ok:
        raise LoraLegoError(f"{key} must be a {'whole number >= 1' if whole else 'finite number > 0'}, "
                            f"got {_one_line(value)}", path=cfg_path)


def _one_line(x: object) -> str:
    """A short one-line rendering of a config value or an error (containers by type, never deep)."""
    if isinstance(x, (list, dict)):
        return f"a {'list' if isinstance(x, list) else 'JSON object'}"
    text = " ".join(str(x if isinstance(x, Exception) else repr(x)).split())
    return text if len(text) <= 80 else text[:77] + "..."


def load_peft(path: Path) -> Adapter:
    path = Path(path)
    config = read_config(path)
    if (path / SAFETENSORS_NAME).is_file():
        weights = path / SAFETENSORS_NAME
    elif (path / BIN_NAME).is_file():
        weights = path / BIN_NAME
    else:
        raise LoraLegoError(f"has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}", path=path)
    source = TensorSource.open(weights)

    keys: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    others: list[str] = []
    for key in source.keys():
        for marker, what in _REFUSED:
            if marker in key:
                raise LoraLegoError(f"holds {what}; lora-lego merges plain LoRA factors only", path=weights,
                                    module=_strip_prefix(key.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0]))
        for suffix, (role, kind) in _SUFFIXES.items():
            if key.endswith(suffix):
                name = _strip_prefix(key[: -len(suffix)])
                keys.setdefault(name, {})[role] = key
                kinds[name] = kind
                break
        else:
            others.append(key)
    if others:
        raise LoraLegoError(
            f"holds {len(others)} tensor(s) that are not LoRA factors (e.g. {others[0]}; modules_to_save or "
            "trainable tokens?): lora-lego merges LoRA factors only", path=weights)
    if not keys:
        raise LoraLegoError("holds no LoRA factors (no lora_A/lora_B keys)", path=weights)

    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, ModuleSpec] = {}
    for name, roles in keys.items():
        if set(roles) != {"A", "B"}:
            missing = ({"A", "B"} - set(roles)).pop()
            raise LoraLegoError(f"has lora_{'B' if missing == 'B' else 'A'} missing", path=weights, module=name)
        a_shape, b_shape = source.shape(roles["A"]), source.shape(roles["B"])
        kind = kinds[name]
        if len(a_shape) == 4:
            kind = "conv"
            if len(b_shape) != 4 or tuple(b_shape[2:]) != (1, 1):
                raise LoraLegoError(f"conv lora_B must be (out, r, 1, 1), got {tuple(b_shape)}", path=weights, module=name)
        elif len(a_shape) != 2 or len(b_shape) != 2:
            raise LoraLegoError(f"unsupported factor shapes A {tuple(a_shape)}, B {tuple(b_shape)}", path=weights, module=name)
        if 0 in a_shape or 0 in b_shape:
            raise LoraLegoError(f"has an empty factor (A {tuple(a_shape)}, B {tuple(b_shape)})", path=weights, module=name)
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise LoraLegoError(f"lora_A has rank {rank} but lora_B has {b_shape[1]}", path=weights, module=name)
        r_cfg, alpha = module_rank_alpha(config, name)
        if r_cfg != rank:
            raise LoraLegoError(f"tensors have rank {rank} but {CONFIG_NAME} gives r={r_cfg} for it "
                                "(check r and rank_pattern)", path=weights, module=name)
        dtypes = {source.dtype(roles["A"]), source.dtype(roles["B"])}
        if not all(d.is_floating_point for d in dtypes):
            raise LoraLegoError(f"factors must be floating point, got {sorted(map(str, dtypes))}", path=weights, module=name)
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        modules[name] = ModuleSpec(name, rank, alpha, lora_scale(alpha, rank, use_rslora),
                                   tuple(a_shape), tuple(b_shape), dtype, kind)

    def load_into(name: str, out: tuple[torch.Tensor, torch.Tensor]) -> Factors:
        """The loader's values written into ``out``, converted in the copy and scaled in place; unchecked
        (see ``Adapter.load_into``)."""
        spec = modules[name]
        roles = keys[name]
        A = source.read_into(roles["A"], out[0])
        B = source.read_into(roles["B"], out[1])
        return Factors(A, B.mul_(spec.scale), spec.scale)  # the scale multiplied in float32, as in loader

    def loader(name: str) -> Factors:
        spec = modules[name]
        roles = keys[name]
        A = source.get(roles["A"]).to(torch.float32).reshape(spec.rank, -1)
        B = source.get(roles["B"]).to(torch.float32).reshape(-1, spec.rank)
        check_finite(A, weights, name, "lora_A")
        check_finite(B, weights, name, "lora_B")
        scaled = B * spec.scale
        if not bool(torch.isfinite(scaled.sum())) and not torch.isfinite(scaled).all():  # the sum: one cheap pass
            raise LoraLegoError(f"lora_B times the scale {spec.scale:.3g} (lora_alpha / r) overflows float32",
                                path=weights, module=name)
        return Factors(A, scaled, spec.scale)

    return Adapter(
        modules=modules,
        loader=loader,
        load_into=load_into,
        format="peft",
        path=path,
        base_model=config.get("base_model_name_or_path"),
        config=config,
    )


def _strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _target_name(name: str) -> str:
    """The module's last name, or its last two where the last is an index (``to_out.0``): PEFT matches a
    target against the end of a module's name, and a bare "0" would match whole blocks."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def peft_output_config(adapter: Adapter, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter_config.json for writing ``adapter`` with the scale folded into B: alpha = r for every
    module (scale 1, so runtimes with a single scale, like vLLM, read the same ΔW), rank_pattern and
    alpha_pattern only for modules whose rank differs from the most common one."""
    config = dict(template if template is not None else adapter.config)
    ranks = [spec.rank for spec in adapter.modules.values()]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r)) if ranks else 1
    pattern = {name: spec.rank for name, spec in adapter.modules.items() if spec.rank != common}
    config.update(
        peft_type="LORA",
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
    )
    config.setdefault("bias", "none")
    config.setdefault("fan_in_fan_out", False)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("modules_to_save", None)
    config.setdefault("init_lora_weights", True)
    config.setdefault("inference_mode", True)
    if adapter.base_model is not None:
        config["base_model_name_or_path"] = adapter.base_model
    target = config.get("target_modules")
    leaves = sorted({_target_name(name) for name in adapter.modules})
    if isinstance(target, list):
        config["target_modules"] = sorted(set(target) | set(leaves))
    elif not isinstance(target, str):
        config["target_modules"] = leaves
    return config


def save_peft(adapter: Adapter, path: Path, *, metadata: dict[str, str] | None = None,
              template: dict[str, Any] | None = None, warn=None) -> torch.dtype:
    """Write ``adapter`` as a PEFT directory into ``path`` (an existing empty folder). Returns the dtype
    the tensors were stored in."""
    from .tensors import store_dtype, write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for name, spec in adapter.modules.items():
        f = adapter.factors(name)
        A = f.A.reshape(spec.a_shape) if spec.kind == "conv" else f.A
        B = f.B.reshape(spec.b_shape) if spec.kind == "conv" else f.B
        if spec.kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = B
    dtype = store_dtype(tensors, adapter.dtype, path, warn)
    config = peft_output_config(adapter, template)
    (Path(path) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_safetensors(Path(path) / SAFETENSORS_NAME, tensors, {"format": "pt", **(metadata or {})}, dtype=dtype)
    return dtype
