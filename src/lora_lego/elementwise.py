"""Elementwise operations on the dense task updates ΔW_i of one module, for TIES, DARE and magnitude
pruning. They follow PEFT's ``peft.utils.merge_utils`` (0.21.2) step for step, so that the same inputs
(and, for DARE, the same random stream) give the same merged update.

Memory: a 4096 x 11008 update is 180 MB in float32, so the N updates of a module are never held at once.
``task_deltas`` forms ΔW_i = B_i A_i when it is asked for (a product of the factors, cheap next to the
elementwise steps); the sums below take one update at a time; and TIES' two passes (elect the sign over
all inputs, then average the agreeing entries) keep, between the passes, only each input's trim or drop
mask, one bit per entry, and form each trimmed update again from its factors and its mask."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

SIGN_METHODS = ("total", "frequency")


class TaskDeltas(Sequence):
    """ΔW_i = B_i A_i (scale folded in), dense, in float32, formed anew each time item i is read: iterating
    holds one update at a time. Reading item i twice gives the same values (the same product)."""

    def __init__(self, factors, dtype: torch.dtype = torch.float32):
        self.factors = list(factors)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self):
        return (self[i] for i in range(len(self)))  # holds no earlier item while the next is formed

    def __getitem__(self, i: int) -> torch.Tensor:
        f = self.factors[i]
        return f.B.to(self.dtype) @ f.A.to(self.dtype)


def task_deltas(factors, dtype: torch.dtype = torch.float32) -> TaskDeltas:
    """The inputs' dense updates ΔW_i = B_i A_i in float32, formed one at a time when read (``TaskDeltas``)."""
    return TaskDeltas(factors, dtype)


def trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Where ``magnitude_trim`` keeps an entry (bool), or None when it keeps all (density >= 1)."""
    if density >= 1:
        return None
    k = int(density * delta.numel())
    keep = torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[keep] = True
    return mask.reshape(delta.shape)


def apply_trim(delta: torch.Tensor, mask: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """delta times the mask (as 0.0 / 1.0); ``inplace`` overwrites ``delta``."""
    if mask is None:
        return delta
    return delta.mul_(mask) if inplace else delta * mask


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density x n) entries of largest magnitude, zero the rest (density >= 1 keeps all)."""
    return apply_trim(delta, trim_mask(delta, density))


def drop_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor | None:
    """DARE's draw: where ``random_drop`` keeps an entry (bool); None, drawing nothing, when density >= 1."""
    if density >= 1:
        return None
    return torch.bernoulli(torch.full_like(delta, density), generator=generator).bool()


def apply_drop(delta: torch.Tensor, mask: torch.Tensor | None, density: float, inplace: bool = False) -> torch.Tensor:
    """The kept entries divided by ``density``, the others 0; ``inplace`` overwrites ``delta``."""
    if mask is None:
        return delta
    return (delta.mul_(mask) if inplace else delta * mask).div_(density)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by ``density``, so that
    the expectation is unchanged. density >= 1 keeps all and draws nothing."""
    return apply_drop(delta, drop_mask(delta, density, generator), density)


_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 entries a byte (1/32 of a float32 update)."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    return (flat.to(torch.uint8) * torch.tensor(_BITS, dtype=torch.uint8, device=mask.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = packed[:, None] >> shifts
    bits &= 1  # 0 or 1 in each byte: a valid bool, viewed without a copy
    return bits.view(torch.bool).reshape(-1)[:n].reshape(shape)


class Masked(Sequence):
    """The inputs' updates after a per-entry mask (DARE's drop, TIES' trim), for methods that read them
    twice. Item i is formed from ``deltas[i]``: the first read computes its mask with ``make_mask`` (in the
    order items are first read, which for DARE is the order of the random draws) and keeps it as bits;
    later reads apply the kept mask to ``deltas[i]`` formed again, giving the same values."""

    def __init__(self, deltas: Sequence[torch.Tensor], make_mask: Callable[[torch.Tensor], torch.Tensor | None],
                 apply: Callable[[torch.Tensor, torch.Tensor | None, bool], torch.Tensor]):
        self.deltas, self.make_mask, self.apply = deltas, make_mask, apply
        self.fresh = isinstance(deltas, TaskDeltas)  # its items are new tensors: masked in place
        self.masks: dict[int, tuple[torch.Tensor, torch.Size] | None] = {}

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor:
        delta = self.deltas[i]
        if i not in self.masks:
            mask = self.make_mask(delta)
            self.masks[i] = None if mask is None else (pack_mask(mask), mask.shape)
        else:
            kept = self.masks[i]
            mask = None if kept is None else unpack_mask(*kept)
        return self.apply(delta, mask, self.fresh)


def weighted_sum(deltas: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i ΔW_i, one update at a time."""
    out = None
    for d, w in zip(deltas, weights):
        if out is None:
            out = torch.zeros_like(d)
        out.add_(d, alpha=w)
        del d  # let it go before the next one is formed
    return out


def elect_sign(deltas: Iterable[torch.Tensor], how: str) -> torch.Tensor:
    """The elected sign per entry (+1 on ties): that of the summed (unweighted) updates ("total") or of the
    count of positive minus negative entries ("frequency")."""
    if how not in SIGN_METHODS:
        raise ValueError(f"unknown sign election {how!r}; expected one of {SIGN_METHODS}")
    mass = None
    for d in deltas:  # accumulated, not stacked: one extra module-sized tensor, not N
        if mass is None:
            mass = torch.zeros_like(d)
        mass.add_(d if how == "total" else d.sign())
        del d  # let it go before the next one is formed
    return torch.where(mass >= 0, 1.0, -1.0).to(mass.dtype)


def disjoint_mean(deltas: Iterable[torch.Tensor], weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the weighted entries whose (unweighted) sign agrees with the elected sign;
    entries that were zeroed never agree, and an entry no input agrees on is 0."""
    total = torch.zeros_like(sign)
    count = torch.zeros_like(sign)
    for d, w in zip(deltas, weights):
        agree = d.sign().eq_(sign)  # 1.0 where the signs agree, 0.0 elsewhere, in the one temporary
        count.add_(agree)
        total.add_(agree.mul_(d), alpha=w)  # = d * agree
        del d  # let it go before the next one is formed
    return total.div_(count.clamp_min_(1.0))  # in place: no further module-sized temporaries


def sign_consensus(deltas: Sequence[torch.Tensor], weights: list[float], how: str) -> torch.Tensor:
    """TIES' last two steps: elect a sign, then the disjoint mean of the agreeing weighted entries. Reads
    each of ``deltas`` twice, one at a time."""
    return disjoint_mean(deltas, weights, elect_sign(deltas, how))
