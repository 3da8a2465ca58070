"""save_adapter: write an adapter atomically in its format, or converted to another one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from .adapter import Adapter
from .errors import LoraLegoError
from .formats import FORMATS, convert
from .formats.peft import save_peft
from .output import atomic_output, check_output_path


def _stderr(msg: str) -> None:
    print(f"lora-lego: warning: {msg}", file=sys.stderr)


def check_output_format(path: Path, target: str) -> None:
    """Refuse an output path the format cannot be written to, before any work."""
    if target not in FORMATS:
        raise LoraLegoError(f"unknown format {target!r}; choose from {', '.join(FORMATS)}")
    if target == "kohya" and Path(path).suffix != ".safetensors":
        raise LoraLegoError("a kohya output is one .safetensors file: give an output name ending in .safetensors",
                            path=path)
    if target == "peft" and Path(path).suffix == ".safetensors":
        raise LoraLegoError("a PEFT output is a folder, not a .safetensors file: give a folder name (or --format "
                            "kohya|diffusers for one file)", path=path)


def save_adapter(adapter: Adapter, path: str | Path, *, format: str | None = None, force: bool = False,
                 inputs: Iterable[Path] = (), warn: Callable[[str], None] | None = _stderr,
                 model_card: bool = True) -> torch.dtype:
    """Write ``adapter`` to ``path`` atomically (a temporary beside it, renamed when complete).

    ``format``: "peft" (a folder), "kohya" (one .safetensors file) or "diffusers" (one .safetensors file, or a
    folder holding pytorch_lora_weights.safetensors when ``path`` does not end in .safetensors); default the
    adapter's own. Converting renames modules where the names allow it (see ``formats.convert``).
    ``path`` must not exist or be an empty folder unless ``force``; it may never be, contain or lie in one of
    ``inputs`` (nor the adapter's own source). A PEFT output gets a README.md model card saying how it was
    made, when ``model_card``. Returns the dtype the tensors were stored in."""
    from .formats.diffusers import WEIGHTS_NAME, save_diffusers
    from .formats.kohya import save_kohya

    path = Path(path)
    target = format or adapter.format
    sources = list(inputs) + ([adapter.path] if adapter.path is not None else [])
    check_output_path(path, sources, force)
    check_output_format(path, target)
    adapter = convert(adapter, target)
    if target == "peft":
        from .card import model_card_text

        with atomic_output(path, force=force, directory=True) as tmp:
            dtype = save_peft(adapter, tmp, metadata=adapter.metadata, warn=warn)
            if model_card:
                (tmp / "README.md").write_text(model_card_text(adapter), encoding="utf-8")
            return dtype
    if target == "kohya":
        with atomic_output(path, force=force, directory=False) as tmp:
            return save_kohya(adapter, tmp, metadata=adapter.metadata, warn=warn)
    if path.suffix == ".safetensors":
        with atomic_output(path, force=force, directory=False) as tmp:
            return save_diffusers(adapter, tmp, metadata=adapter.metadata, warn=warn)
    with atomic_output(path, force=force, directory=True) as tmp:
        return save_diffusers(adapter, tmp / WEIGHTS_NAME, metadata=adapter.metadata, warn=warn)
