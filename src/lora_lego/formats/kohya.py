"""kohya (sd-scripts) LoRA files: one .safetensors with ``<prefix>_<path with _>.lora_down.weight`` (A),
``.lora_up.weight`` (B) and ``.alpha`` (0-d) per module, and ``ss_*`` training metadata in the header.

The scale is alpha / rank; a missing alpha, or alpha 0, means alpha = rank (sd-scripts' rule). A conv LoRA
has lora_down (r, in, kh, kw) and lora_up (out, r, 1, 1); its factors are the 2-d reshape, and ΔW reshaped
to (out, in, kh, kw) is exactly the update sd-scripts and ComfyUI apply."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import Adapter, ModuleSpec
from ..errors import LoraLegoError
from .detect import refuse_unsupported
from .names import canonical_to_kohya, kohya_to_canonical, split_component
from .common import factor_layout, factor_loader
from .tensors import TensorSource, read_safetensors_metadata

_NAMES = ("lora_down", "lora_up")
_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# header entries that hash the file's tensors: stale once the tensors change, so they are dropped
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")


def load_kohya(path: Path) -> Adapter:
    path = Path(path)
    source = TensorSource.open(path)
    keys = source.keys()
    refuse_unsupported(keys, path)
    groups: dict[str, dict[str, str]] = {}
    others = []
    for key in keys:
        lora_name, _, suffix = key.partition(".")
        role = _ROLES.get(suffix)
        if role is None:
            others.append(key)
            continue
        groups.setdefault(lora_name, {})[role] = key
    if others:
        raise LoraLegoError(f"holds {len(others)} tensor(s) that are not kohya LoRA factors (e.g. {others[0]}; "
                            "embeddings or another network type?): lora-lego merges LoRA factors only", path=path)

    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    alphas = _read_alphas(source, {n: r["alpha"] for n, r in groups.items() if "alpha" in r})
    modules: dict[str, ModuleSpec] = {}
    keys_of: dict[str, tuple[str, str]] = {}
    prefixes: dict[str, str] = {}
    for lora_name, roles in groups.items():
        name, prefix = kohya_to_canonical(lora_name, path)
        if "A" not in roles or "B" not in roles:
            missing = "lora_up" if "A" in roles else "lora_down"
            raise LoraLegoError(f"has {missing} missing", path=path, module=lora_name)
        if name in modules:
            raise LoraLegoError(f"names the same module twice (as {lora_name} and {modules[name].name}"
                                f" under another prefix)", path=path, module=lora_name)
        component = split_component(name)[0]
        if prefixes.setdefault(component, prefix) != prefix:
            raise LoraLegoError(f"mixes the prefixes {prefixes[component]}_ and {prefix}_ for one text encoder",
                                path=path, module=lora_name)
        kind, rank, a_shape, b_shape, dtype = factor_layout(source, roles["A"], roles["B"], path, lora_name, _NAMES)
        alpha = alphas.get(lora_name, 0.0) or float(rank)
        modules[name] = ModuleSpec(name, rank, alpha, alpha / rank, a_shape, b_shape, dtype, kind)
        keys_of[name] = (roles["A"], roles["B"])
    if not modules:
        raise LoraLegoError("holds no LoRA factors", path=path)

    return Adapter(modules=modules, loader=factor_loader(source, path, modules, keys_of, _NAMES), format="kohya",
                   path=path, base_model=metadata.get("ss_sd_model_name") or None,
                   config={"kohya_metadata": metadata, "kohya_prefixes": prefixes})


def _read_alphas(source: TensorSource, alpha_keys: dict[str, str]) -> dict[str, float]:
    """Every module's alpha (0-d tensors, a few bytes each), read through one open file."""
    out = {}
    if not alpha_keys:
        return out
    if source.path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source.path), framework="pt") as f:
            values = {n: f.get_tensor(k) for n, k in alpha_keys.items()}
    else:
        values = {n: source.get(k) for n, k in alpha_keys.items()}
    for name, t in values.items():
        if t.numel() != 1:
            raise LoraLegoError(f"alpha must be a single number, got shape {tuple(t.shape)}", path=source.path,
                                module=name)
        value = float(t.reshape(()).to(torch.float64))
        if not (value >= 0 and value < float("inf")):
            raise LoraLegoError(f"alpha must be a finite number >= 0, got {value}", path=source.path, module=name)
        out[name] = value
    return out


def _common(values: list[int]) -> int:
    return max(set(values), key=lambda r: (values.count(r), r))


def kohya_metadata(adapter: Adapter, extra: dict[str, str] | None) -> dict[str, str]:
    """The header metadata for writing ``adapter``: the input's ``ss_*`` entries with the network dim and
    alpha updated (alpha = rank everywhere: the scale is folded into lora_up), tensor hashes dropped."""
    meta = {k: v for k, v in (adapter.config.get("kohya_metadata") or {}).items() if k not in _STALE_METADATA}
    linear = [s.rank for s in adapter.modules.values() if s.kind != "conv"]
    conv = [s.rank for s in adapter.modules.values() if s.kind == "conv"]
    meta.setdefault("ss_network_module", "networks.lora")
    if linear or conv:
        dim = _common(linear or conv)
        meta["ss_network_dim"] = str(dim)
        meta["ss_network_alpha"] = str(float(dim))
    if conv and "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
        except (json.JSONDecodeError, TypeError):
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            args["conv_dim"] = str(_common(conv))
            args["conv_alpha"] = str(float(_common(conv)))
            meta["ss_network_args"] = json.dumps(args)
    meta.update(extra or {})
    return meta


def kohya_names(adapter: Adapter) -> dict[str, str]:
    """Canonical module name -> kohya module name. Text encoders keep the prefix the input used; otherwise
    lora_te_ for a lone text encoder and lora_te1_/lora_te2_ beside a second one or for SDXL."""
    prefixes = dict(adapter.config.get("kohya_prefixes") or {})
    components = {split_component(n)[0] for n in adapter.modules}
    sdxl = str((adapter.config.get("kohya_metadata") or {}).get("ss_base_model_version", "")).startswith("sdxl")
    if "text_encoder" not in prefixes and ("text_encoder_2" in components or sdxl):
        prefixes["text_encoder"] = "lora_te1"
    out = {}
    for name in adapter.modules:
        try:
            out[name] = canonical_to_kohya(name, prefixes)
        except ValueError:
            raise LoraLegoError("has no pipeline component (unet., transformer., text_encoder.) in its name, "
                                "so it has no kohya name", path=adapter.label, module=name) from None
    if len(set(out.values())) != len(out):
        raise LoraLegoError("two modules have the same kohya name", path=adapter.label)
    return out


def save_kohya(adapter: Adapter, path: Path, *, metadata: dict[str, str] | None = None, warn=None) -> torch.dtype:
    """Write ``adapter`` as one kohya .safetensors file at ``path``; alpha = rank per module (scale folded into
    lora_up). Returns the dtype the factors were stored in."""
    from .tensors import store_dtype, write_safetensors

    names = kohya_names(adapter)
    factors: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    for name, spec in adapter.modules.items():
        f = adapter.factors(name)
        kname = names[name]
        factors[f"{kname}.lora_down.weight"] = f.A.reshape(spec.a_shape) if spec.kind == "conv" else f.A
        factors[f"{kname}.lora_up.weight"] = f.B.reshape(spec.b_shape) if spec.kind == "conv" else f.B
        alphas[f"{kname}.alpha"] = torch.tensor(float(spec.rank), dtype=torch.float32)
    dtype = store_dtype(factors.values(), adapter.dtype, path, warn)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in factors.items()}
    tensors.update(alphas)
    write_safetensors(Path(path), tensors, kohya_metadata(adapter, metadata))
    return dtype
