"""save_adapter: write an adapter atomically in its format."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from .adapter import Adapter
from .errors import LoraLegoError
from .formats.peft import save_peft
from .output import atomic_output, check_output_path


def _stderr(msg: str) -> None:
    print(f"lora-lego: warning: {msg}", file=sys.stderr)


def save_adapter(adapter: Adapter, path: str | Path, *, force: bool = False, inputs: Iterable[Path] = (),
                 warn: Callable[[str], None] | None = _stderr) -> torch.dtype:
    """Write ``adapter`` to ``path`` atomically (a temporary beside it, renamed when complete).

    ``path`` must not exist or be an empty folder unless ``force``; it may never be, contain or lie in one of
    ``inputs`` (nor the adapter's own source). Returns the dtype the tensors were stored in."""
    path = Path(path)
    sources = list(inputs) + ([adapter.path] if adapter.path is not None else [])
    check_output_path(path, sources, force)
    if adapter.format != "peft":
        raise LoraLegoError(f"writing the {adapter.format} format is not supported yet", path=path)
    with atomic_output(path, force=force, directory=True) as tmp:
        return save_peft(adapter, tmp, metadata=adapter.metadata, warn=warn)
