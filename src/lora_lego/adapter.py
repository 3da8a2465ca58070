"""The canonical adapter model: modules by name, each a pair of factors with the scale folded in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch


@dataclass
class Factors:
    """One module's low-rank update, ΔW = B @ A exactly.

    A is (r x d_in), B is (d_out x r). The adapter's scale (alpha/r, or alpha/sqrt(r) under rsLoRA)
    is already folded into B; ``scale`` records the value that was folded, so that methods which
    split it differently between the halves can undo it.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"inconsistent factor shapes A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (d_out, d_in) of ΔW."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense update ΔW = B @ A (for tests and small modules only)."""
        return self.B @ self.A

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Factors":
        return Factors(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype), self.scale)


@dataclass
class ModuleSpec:
    """What is known about one module without reading its tensors.

    ``a_shape`` and ``b_shape`` are the stored tensor shapes (a conv LoRA has 4-d ones); the factors
    are always the 2-d reshape. ``kind`` is "linear", "embedding" or "conv"; it decides the key names
    a writer uses.
    """

    name: str
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = "linear"

    @property
    def d_in(self) -> int:
        n = 1
        for s in self.a_shape[1:]:
            n *= s
        return n

    @property
    def d_out(self) -> int:
        return self.b_shape[0]


@dataclass
class Adapter:
    """An ordered mapping from canonical module name to lazily read factors, plus the metadata needed to
    write an adapter back in its format.

    ``loader(name)`` returns the module's factors in float32 with the scale folded into B; it reads only
    that module's tensors. An adapter built in memory (a merge result) has ``loader`` over a dict.
    """

    modules: dict[str, ModuleSpec]
    loader: Callable[[str], Factors]
    format: str = "peft"
    path: Path | None = None
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    # ``load_into(name, (A, B))``: ``loader``'s values written into two given float32 tensors, without its
    # checks for NaN, Inf and overflow (the merge driver checks a module's stacked factors in one pass and
    # reads again with ``loader`` for the exact error); see ``factors``. A format without one is read with
    # ``loader`` and copied.
    load_into: Callable[[str, tuple[torch.Tensor, torch.Tensor]], Factors] | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def factors(self, name: str, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Factors:
        """The module's factors (float32, scale folded into B); with ``out``, written into those two float32
        tensors of the factors' shapes (views of a module's stacked factors, as the merge driver reads them:
        converted straight into place, no copy to stack them later), which the returned factors are; then
        the values may not have been checked for NaN, Inf or overflow (see ``load_into``)."""
        if out is None:
            return self.loader(name)
        if self.load_into is not None:
            return self.load_into(name, out)
        f = self.loader(name)
        return Factors(out[0].copy_(f.A), out[1].copy_(f.B), f.scale)

    @property
    def dtype(self) -> torch.dtype:
        dtypes = {spec.dtype for spec in self.modules.values()}
        return widest_dtype(dtypes) if dtypes else torch.float32

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<in memory>"

    @classmethod
    def from_factors(
        cls,
        factors: dict[str, Factors],
        *,
        dtype: torch.dtype = torch.float32,
        kinds: dict[str, ModuleSpec] | None = None,
        **kwargs,
    ) -> "Adapter":
        """An adapter held in memory, e.g. a merge result. ``kinds`` supplies the stored shapes of
        conv or embedding modules so that a writer can restore them."""
        specs = {}
        for name, f in factors.items():
            template = (kinds or {}).get(name)
            a_shape: tuple[int, ...] = tuple(f.A.shape)
            b_shape: tuple[int, ...] = tuple(f.B.shape)
            kind = "linear"
            if template is not None:
                kind = template.kind
                a_shape = (f.rank, *template.a_shape[1:])
                b_shape = (template.b_shape[0], f.rank, *template.b_shape[2:])
            specs[name] = ModuleSpec(name, f.rank, float(f.rank), 1.0, a_shape, b_shape, dtype, kind)
        store = dict(factors)
        return cls(modules=specs, loader=store.__getitem__, **kwargs)


def widest_dtype(dtypes: set[torch.dtype] | list[torch.dtype]) -> torch.dtype:
    """The dtype that holds every one of ``dtypes`` without loss: one dtype stays itself, a mix
    (fp16 with bf16, say) becomes float32, or float64 if any input is float64."""
    dtypes = set(dtypes)
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return torch.float64 if torch.float64 in dtypes else torch.float32
