"""Checks and the lazy factor loader shared by the single-file readers (kohya, diffusers)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import Factors, ModuleSpec
from ..errors import LoraLegoError
from .tensors import TensorSource, check_finite


def factor_layout(source: TensorSource, a_key: str, b_key: str, path: Path, module: str,
                  names: tuple[str, str]) -> tuple[str, int, tuple, tuple, torch.dtype]:
    """(kind, rank, A's shape, B's shape, dtype) of one module, checked: linear (r x in, out x r) or conv
    (r x in x kh x kw, out x r x 1 x 1), ranks agreeing, floating point. ``names`` are the file's words for
    A and B (lora_down/lora_up, lora_A/lora_B)."""
    a_shape, b_shape = tuple(source.shape(a_key)), tuple(source.shape(b_key))
    kind = "linear"
    if len(a_shape) == 4:
        kind = "conv"
        if len(b_shape) != 4 or b_shape[2:] != (1, 1):
            raise LoraLegoError(f"conv {names[1]} must be (out, r, 1, 1), got {b_shape}", path=path, module=module)
    elif len(a_shape) != 2 or len(b_shape) != 2:
        raise LoraLegoError(f"unsupported factor shapes {names[0]} {a_shape}, {names[1]} {b_shape}", path=path,
                            module=module)
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise LoraLegoError(f"{names[0]} has rank {rank} but {names[1]} has {b_shape[1]}", path=path, module=module)
    dtypes = {source.dtype(a_key), source.dtype(b_key)}
    if not all(d.is_floating_point for d in dtypes):
        raise LoraLegoError(f"factors must be floating point, got {sorted(map(str, dtypes))}", path=path, module=module)
    return kind, rank, a_shape, b_shape, (dtypes.pop() if len(dtypes) == 1 else torch.float32)


def factor_loader(source: TensorSource, path: Path, modules: dict[str, ModuleSpec], keys: dict[str, tuple[str, str]],
                  names: tuple[str, str]):
    """``loader(name)``: that module's two tensors, read now, in float32, scale folded into B."""

    def loader(name: str) -> Factors:
        spec = modules[name]
        a_key, b_key = keys[name]
        A = source.get(a_key).to(torch.float32).reshape(spec.rank, -1)
        B = source.get(b_key).to(torch.float32).reshape(-1, spec.rank)
        check_finite(A, path, name, names[0])
        check_finite(B, path, name, names[1])
        return Factors(A, B * spec.scale, spec.scale)

    return loader
