"""Merge methods: one small module each, registered by name, sharing one signature.

A method is ``fn(factors, weights, rank, *, generator, **options) -> Factors`` over one module:
``factors`` are the inputs that have the module (float32, scale folded into B, on the merge device),
``weights`` one number per input, ``rank`` the requested output rank (None for exact methods), and
``generator`` a torch.Generator seeded for this module. It never sees files, formats or the CLI.

A method may also name ``prepare(factors)``, work on a module's factors alone (lego: stacking them and
their Gram products; linear: the QR of the stacked Aᵀ) that the merge driver runs in its reader thread,
on the merge device, beside the merge of the previous module; the result reaches ``fn`` as the keyword
``prepared``. ``fn`` must give the same result without it. And ``fn_many(jobs, rank, **options) ->
list[Factors]``, several modules (``ModuleJob``s) in one call, where that is cheaper (lego batches their
k-means); it must give each module what ``fn`` gives it. A method with ``fn_many`` may split off its last
step as ``finish`` (see ``MergeMethod``), which the driver runs in the reader thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..adapter import Factors


@dataclass(frozen=True)
class Option:
    """A method's knob: its CLI flag is ``--`` + name with ``_`` as ``-``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    valid: Callable[[Any], bool] | None = None  # a further check of the value, e.g. a range
    valid_text: str = ""  # what ``valid`` asks, for the error message: "in (0, 1]"


@dataclass
class ModuleJob:
    """One module's arguments to a method, for ``fn_many``."""

    factors: list[Factors]
    weights: list[float]
    generator: Any  # torch.Generator seeded for this module
    prepared: Any = None  # what the method's prepare returned, if it has one


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    fn: Callable[..., Factors]
    options: tuple[Option, ...] = ()
    takes_rank: bool = True  # False: exact at rank Σ r_i, --rank is refused
    default_weight: str = "one"  # "one": 1 each; "mean": 1/N each
    equal_ranks: bool = False  # inputs must share one rank per module
    prepare: Callable[[list[Factors]], Any] | None = None  # run in the reader thread, passed as prepared=
    # prepare also takes known=(G_A, G_B, sign) of the stacked factors where the CLI computed them ahead
    # (prefetch.py, bit for bit as msu.stacked_grams does)
    prepare_takes_grams: bool = False
    # with fn_many: called with finish_later=True, fn_many returns what finish turns into each module's
    # Factors; the driver runs finish in its reader thread (lego: forming the centroids from the raw factors)
    finish: Callable[[Any], Factors] | None = None
    fn_many: Callable[..., list[Factors]] | None = None  # several modules in one call
    description: str = ""

    def option_defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    from ..errors import LoraLegoError

    try:
        return METHODS[name]
    except KeyError:
        raise LoraLegoError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def fraction(value: Any) -> bool:
    """A density: a share of entries kept, in (0, 1]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


from . import lego, concat  # noqa: E402,F401  (registration)
from . import ensemble, average, linear, task_arithmetic, ties, dare, magnitude_prune  # noqa: E402,F401
