"""Format detection and dispatch for reading adapters, and renaming modules from one convention to another."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..adapter import Adapter
from ..errors import LoraLegoError
from .detect import detect_format
from .names import infer_component, split_component, unknown_words
from .peft import is_peft_dir, load_peft

FORMATS = ("peft", "kohya", "diffusers")


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter's metadata; its tensors are read lazily, one module at a time.

    ``path`` is a PEFT folder, a kohya or diffusers ``.safetensors`` file (told apart by their tensor
    names), or a folder holding a diffusers ``pytorch_lora_weights.safetensors``."""
    from .diffusers import WEIGHTS_NAME, load_diffusers
    from .kohya import load_kohya
    from .tensors import TensorSource

    path = Path(path)
    if not path.exists():
        raise LoraLegoError("no such file or folder", path=path)
    if path.is_file() and path.name in ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json") \
            and is_peft_dir(path.parent):
        path = path.parent
    if is_peft_dir(path):
        return load_peft(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            path = path / WEIGHTS_NAME
        else:
            raise LoraLegoError(f"folder holds no adapter (no adapter_config.json, no {WEIGHTS_NAME})", path=path)
    if path.suffix not in (".safetensors", ".bin"):
        raise LoraLegoError("not a recognised adapter (expected a PEFT folder or a kohya/diffusers .safetensors file)",
                            path=path)
    fmt = detect_format(TensorSource.open(path).keys(), path)
    if fmt == "kohya":
        return load_kohya(path)
    if fmt == "diffusers":
        return load_diffusers(path)
    raise LoraLegoError("holds PEFT weights (base_model.model.* keys) but no adapter_config.json beside it", path=path)


def convert(adapter: Adapter, target: str) -> Adapter:
    """The same adapter with its modules named in ``target``'s convention (lazy: factors are not read).

    kohya and diffusers name modules ``<component>.<path>``; PEFT names one model's modules by path alone.
    Refused, with the module named, where the names do not allow it: a kohya name whose parts the vocabulary
    does not know (it may have been split wrongly, or use SDXL's or Flux's original layout, which diffusers
    lays out differently); several components into one PEFT adapter; a PEFT adapter whose module names do
    not say which pipeline component they belong to; embedding LoRAs into kohya or diffusers files."""
    if target not in FORMATS:
        raise LoraLegoError(f"unknown format {target!r}; choose from {', '.join(FORMATS)}")
    source = adapter.format
    if target == source:
        return adapter
    rename: dict[str, str] = {}
    if source == "kohya":
        for name in adapter.modules:
            component, inner = split_component(name)
            bad = unknown_words(inner)
            if bad:
                raise LoraLegoError(
                    f"cannot convert kohya names to {target}: {name!r} has parts the name vocabulary does not know "
                    f"({', '.join(bad)}), so its dots cannot be restored safely (SDXL's and Flux's original layouts "
                    "differ from diffusers'); keep --format kohya", path=adapter.label, module=name)
    if target == "peft":
        components = {split_component(n)[0] for n in adapter.modules}
        if len(components) > 1:
            raise LoraLegoError(
                f"holds modules of several pipeline components ({', '.join(sorted(map(str, components)))}); a PEFT "
                "adapter covers one model: keep --format " + source, path=adapter.label)
        rename = {n: split_component(n)[1] for n in adapter.modules}
    elif source == "peft":
        if any(s.kind == "embedding" for s in adapter.modules.values()):
            name = next(n for n, s in adapter.modules.items() if s.kind == "embedding")
            raise LoraLegoError(f"is an embedding LoRA, which {target} files do not hold", path=adapter.label, module=name)
        component = infer_component(adapter.modules)
        if component is None:
            raise LoraLegoError(
                f"cannot tell which diffusion pipeline component (unet, transformer, text_encoder) these modules "
                f"belong to (e.g. {next(iter(adapter.modules))}), which {target} files name; keep --format peft",
                path=adapter.label)
        rename = {n: f"{component}.{n}" for n in adapter.modules}
    else:
        rename = {n: n for n in adapter.modules}
    modules = {rename[n]: dataclasses.replace(s, name=rename[n]) for n, s in adapter.modules.items()}
    back = {v: k for k, v in rename.items()}
    loader = adapter.loader
    # settings private to the source format (kohya's ss_* header, diffusers' header) do not carry over
    config = {k: v for k, v in adapter.config.items() if not k.startswith(f"{source}_")}
    load_into = adapter.load_into
    return dataclasses.replace(adapter, modules=modules, loader=lambda name: loader(back[name]), format=target,
                               config=config,
                               load_into=(lambda name, out: load_into(back[name], out)) if load_into else None)
