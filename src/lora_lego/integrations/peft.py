"""Merge LoRA adapters already loaded in a PEFT model into a new named adapter of that model, like
``PeftModel.add_weighted_adapter`` but with every lora-lego method.

    from peft import PeftModel
    from lora_lego.integrations.peft import merge_peft_adapters

    model = PeftModel.from_pretrained(base, "math-lora", adapter_name="math")
    model.load_adapter("code-lora", adapter_name="code")
    merge_peft_adapters(model, ["math", "code"], "math+code", method="lego", rank=16)
    model.set_adapter("math+code")
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..adapter import Adapter, Factors, ModuleSpec
from ..errors import LoraLegoError


def _lora_layers(model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    root = model.base_model.model
    return {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}


def adapter_from_peft_model(model, adapter_name: str) -> Adapter:
    """A lazy ``Adapter`` over one LoRA adapter loaded in ``model`` (a PeftModel): module names as in the
    saved adapter (``model.layers.0.self_attn.q_proj``), the adapter's scaling (alpha/r or rsLoRA's)
    folded into B."""
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise LoraLegoError(f"the model has no adapter named {adapter_name!r} "
                            f"(it has {', '.join(map(repr, model.peft_config)) or 'none'})")
    if str(getattr(config, "peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise LoraLegoError(f"adapter {adapter_name!r} is {config.peft_type}, not LoRA")
    layers = {}
    modules: dict[str, ModuleSpec] = {}
    for name, layer in _lora_layers(model).items():
        if adapter_name in layer.lora_A:
            A, B, kind = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, "linear"
            if A.dim() == 4:
                kind = "conv"
            elif A.dim() != 2:
                raise LoraLegoError(f"unsupported LoRA layer with factor shapes {tuple(A.shape)}, {tuple(B.shape)}",
                                    path=f"adapter {adapter_name}", module=name)
        elif adapter_name in getattr(layer, "lora_embedding_A", {}):
            A, B, kind = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name], "embedding"
        else:
            continue
        if layer.use_dora.get(adapter_name, False):
            raise LoraLegoError("is DoRA; lora-lego merges plain LoRA factors only", path=f"adapter {adapter_name}",
                                module=name)
        if getattr(layer, "lora_bias", {}).get(adapter_name, False):
            raise LoraLegoError("has a LoRA bias; lora-lego merges plain LoRA factors only",
                                path=f"adapter {adapter_name}", module=name)
        rank = A.shape[0]
        scale = float(layer.scaling[adapter_name])
        dtype = A.dtype if A.dtype == B.dtype else torch.float32
        modules[name] = ModuleSpec(name, rank, float(layer.lora_alpha[adapter_name]), scale, tuple(A.shape),
                                   tuple(B.shape), dtype, kind)
        layers[name] = (A, B)
    if not modules:
        raise LoraLegoError(f"adapter {adapter_name!r} has no LoRA layers in the model")

    def loader(name: str) -> Factors:
        spec = modules[name]
        A, B = layers[name]
        A = A.detach().to("cpu", torch.float32).reshape(spec.rank, -1)
        B = B.detach().to("cpu", torch.float32).reshape(-1, spec.rank)
        return Factors(A, B * spec.scale, spec.scale)

    return Adapter(modules=modules, loader=loader, format="peft", path=None,
                   base_model=getattr(config, "base_model_name_or_path", None),
                   config={k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()})


def merge_peft_adapters(model, adapters: Sequence[str], new_adapter_name: str, method: str = "lego",
                        rank: int | None = None, weights: Sequence[float] | None = None, seed: int = 0,
                        device: str | torch.device = "cpu", **options: Any) -> Adapter:
    """Merge the LoRA adapters named ``adapters`` of ``model`` (a PeftModel) with ``method`` into a new adapter
    ``new_adapter_name`` of the same model; the active adapter is not changed (``model.set_adapter`` it).

    ``rank``, ``weights``, ``seed``, ``device`` and method options are those of ``lora_lego.merge``. The new
    adapter has lora_alpha = r per module (the scale is folded into lora_B), so its ΔW is exactly the
    merge's. Returns the merged ``Adapter`` (its ``metadata["lora_lego"]`` says how it was made)."""
    from peft import LoraConfig

    from ..merge import merge

    if new_adapter_name in model.peft_config:
        raise LoraLegoError(f"the model already has an adapter named {new_adapter_name!r}")
    inputs = [adapter_from_peft_model(model, name) for name in adapters]
    merged = merge(inputs, method=method, rank=rank, weights=weights, seed=seed, device=device, **options)
    source_config = model.peft_config[adapters[0]]
    ranks = {name: spec.rank for name, spec in merged.modules.items()}
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
    pattern = {name: r for name, r in ranks.items() if r != common}
    config = LoraConfig(
        r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
        target_modules=sorted(merged.modules), use_rslora=False, use_dora=False, lora_dropout=0.0,
        fan_in_fan_out=getattr(source_config, "fan_in_fan_out", False), bias="none",
        task_type=getattr(source_config, "task_type", None),
        base_model_name_or_path=getattr(source_config, "base_model_name_or_path", None),
        init_lora_weights=True,
    )
    model.add_adapter(new_adapter_name, config)
    layers = _lora_layers(model)
    with torch.no_grad():
        for name, spec in merged.modules.items():
            layer = layers[name]
            f = merged.factors(name)
            if spec.kind == "embedding":
                a_param, b_param = layer.lora_embedding_A[new_adapter_name], layer.lora_embedding_B[new_adapter_name]
            else:
                a_param, b_param = layer.lora_A[new_adapter_name].weight, layer.lora_B[new_adapter_name].weight
            if tuple(a_param.shape[:1]) != (spec.rank,) or b_param.shape[1] != spec.rank:
                raise LoraLegoError(f"PEFT made a layer of rank {a_param.shape[0]} where the merge has {spec.rank}",
                                    module=name)
            a_param.copy_(f.A.reshape(a_param.shape).to(a_param.dtype))
            b_param.copy_(f.B.reshape(b_param.shape).to(b_param.dtype))
            if abs(float(layer.scaling[new_adapter_name]) - 1.0) > 1e-12:
                raise LoraLegoError(f"PEFT gave the merged layer scaling {layer.scaling[new_adapter_name]}, not 1",
                                    module=name)
    return merged
