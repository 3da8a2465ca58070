"""diffusers LoRA files (``pipe.save_lora_weights``): one .safetensors with
``<component>.<dotted path>.lora_A.weight`` / ``.lora_B.weight``, the component being ``unet``,
``transformer``, ``text_encoder``, ``text_encoder_2``...; rank and alpha per component in the header entry
``lora_adapter_metadata`` (a JSON LoraConfig, its keys prefixed ``<component>.``), alpha = rank without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, ModuleSpec
from ..errors import LoraLegoError
from .detect import refuse_unsupported
from .names import COMPONENTS, split_component
from ..peft_rules import lora_scale, module_rank_alpha
from .common import factor_layout, factor_loader
from .tensors import TensorSource, read_safetensors_metadata

METADATA_KEY = "lora_adapter_metadata"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_NAMES = ("lora_A", "lora_B")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


def component_configs(raw: dict[str, Any] | None) -> dict[str | None, dict[str, Any]]:
    """Split ``lora_adapter_metadata`` into one LoraConfig dict per component (key None: one config for a
    file whose names carry no component, as ``model.save_lora_adapter`` writes)."""
    if not raw:
        return {}
    packed = [k for k in raw if k.split(".", 1)[0] in COMPONENTS and "." in k]
    if not packed:
        return {None: raw}
    out: dict[str | None, dict[str, Any]] = {}
    for key, value in raw.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = value
    return out


def load_diffusers(path: Path) -> Adapter:
    path = Path(path)
    source = TensorSource.open(path)
    keys = source.keys()
    refuse_unsupported(keys, path)
    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    raw = None
    if metadata.get(METADATA_KEY):
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LoraLegoError(f"header entry {METADATA_KEY} is not valid JSON ({e})", path=path) from None
        if not isinstance(raw, dict):
            raise LoraLegoError(f"header entry {METADATA_KEY} is not a JSON object", path=path)
    configs = component_configs(raw)
    for cfg in configs.values():
        if cfg.get("use_dora"):
            raise LoraLegoError(f"{METADATA_KEY} says use_dora: DoRA adapters are not supported", path=path)

    groups: dict[str, dict[str, str]] = {}
    others = []
    for key in keys:
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            others.append(key)
    if others:
        raise LoraLegoError(f"holds {len(others)} tensor(s) that are not LoRA factors (e.g. {others[0]}): "
                            "lora-lego merges LoRA factors only", path=path)
    if not groups:
        raise LoraLegoError("holds no LoRA factors (no lora_A/lora_B keys)", path=path)

    modules: dict[str, ModuleSpec] = {}
    for name, roles in groups.items():
        if set(roles) != {"A", "B"}:
            missing = ({"A", "B"} - set(roles)).pop()
            raise LoraLegoError(f"has lora_{missing} missing", path=path, module=name)
        kind, rank, a_shape, b_shape, dtype = factor_layout(source, roles["A"], roles["B"], path, name, _NAMES)
        component, inner = split_component(name)
        cfg = configs.get(component) if component in configs else configs.get(None)
        if cfg:
            r_cfg, alpha = module_rank_alpha(cfg, inner if component in configs else name)
            if r_cfg != rank:
                raise LoraLegoError(f"tensors have rank {rank} but {METADATA_KEY} gives r={r_cfg} for it",
                                    path=path, module=name)
            scale = lora_scale(alpha, rank, bool(cfg.get("use_rslora", False)))
        else:
            alpha, scale = float(rank), 1.0
        modules[name] = ModuleSpec(name, rank, float(alpha), scale, a_shape, b_shape, dtype, kind)

    keys = {n: (r["A"], r["B"]) for n, r in groups.items()}
    return Adapter(modules=modules, loader=factor_loader(source, path, modules, keys, _NAMES), format="diffusers",
                   path=path)


def _config_for(specs: list[ModuleSpec], names: list[str]) -> dict[str, Any]:
    """A LoraConfig (as a dict) with alpha = r for every module (scale folded into B) and the exact module
    names as targets, so that diffusers adds LoRA layers to these modules and no others."""
    ranks = [s.rank for s in specs]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    pattern = {n: s.rank for n, s in zip(names, specs) if s.rank != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(names), "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True}


def diffusers_metadata(adapter: Adapter) -> str:
    by_component: dict[str | None, tuple[list, list]] = {}
    for name, spec in adapter.modules.items():
        component, inner = split_component(name)
        specs, names = by_component.setdefault(component, ([], []))
        specs.append(spec)
        names.append(inner if component is not None else name)
    packed: dict[str, Any] = {}
    for component, (specs, names) in by_component.items():
        cfg = _config_for(specs, names)
        if component is None:
            packed.update(cfg)
        else:
            packed.update({f"{component}.{k}": v for k, v in cfg.items()})
    return json.dumps(packed, indent=2, sort_keys=True)


def save_diffusers(adapter: Adapter, path: Path, *, metadata: dict[str, str] | None = None, warn=None) -> torch.dtype:
    """Write ``adapter`` as one diffusers .safetensors file at ``path``. Returns the stored dtype."""
    from .tensors import store_dtype, write_safetensors

    components = {split_component(n)[0] for n in adapter.modules}
    if None in components and len(components) > 1:
        name = next(n for n in adapter.modules if split_component(n)[0] is None)
        raise LoraLegoError("has no pipeline component (unet., transformer., text_encoder.) in its name while "
                            "other modules have one", path=adapter.label, module=name)
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in adapter.modules.items():
        f = adapter.factors(name)
        tensors[f"{name}.lora_A.weight"] = f.A.reshape(spec.a_shape) if spec.kind == "conv" else f.A
        tensors[f"{name}.lora_B.weight"] = f.B.reshape(spec.b_shape) if spec.kind == "conv" else f.B
    dtype = store_dtype(tensors.values(), adapter.dtype, path, warn)
    header = {"format": "pt", METADATA_KEY: diffusers_metadata(adapter), **(metadata or {})}
    write_safetensors(Path(path), tensors, header, dtype=dtype)  # converted one tensor at a time
    return dtype
