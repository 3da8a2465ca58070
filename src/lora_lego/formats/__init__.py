"""Format detection and dispatch for reading and writing adapters."""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter
from ..errors import LoraLegoError
from .peft import is_peft_dir, load_peft

FORMATS = ("peft",)


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter's metadata; its tensors are read lazily, one module at a time."""
    path = Path(path)
    if not path.exists():
        raise LoraLegoError("no such file or folder", path=path)
    if path.is_file() and path.name in ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"):
        path = path.parent
    if is_peft_dir(path):
        return load_peft(path)
    if path.is_dir():
        raise LoraLegoError("folder holds no adapter (no adapter_config.json)", path=path)
    raise LoraLegoError("not a recognised adapter (expected a PEFT adapter folder)", path=path)
