"""What the experiments share: turning adapters into dense updates, scoring a set of updates on a split,
the output ensemble, and the small tuning grids every method gets alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lora_lego import METHODS, Adapter, merge


def deltas_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: adapter.factors(n).delta() for n in adapter.modules}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def score(track, deltas: dict[str, torch.Tensor] | None, tasks: list[str], split: str) -> dict[str, float]:
    """Per-task accuracy of the base model plus ``deltas`` (None: zero-shot)."""
    track.set_deltas(deltas)
    return {t: accuracy(track.logits(t, split), track.labels(t, split)) for t in tasks}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


@dataclass
class Merged:
    deltas: dict[str, torch.Tensor]
    seconds: float
    rank: int  # the largest module rank of the result


def run_merge(adapters: list[Adapter], method: str, rank: int | None, weights=None, seed: int = 0, **opts) -> Merged:
    t0 = time.perf_counter()
    out = merge(adapters, method=method, rank=rank, weights=weights, seed=seed, **opts)
    seconds = time.perf_counter() - t0
    return Merged(deltas_of(out), seconds, max(s.rank for s in out.modules.values()))


def ensemble_scores(track, adapter_deltas: list[dict], tasks: list[str], split: str) -> dict[str, float]:
    """Output ensemble: the mean of the class probabilities of the N individually adapted models."""
    probs = {t: 0.0 for t in tasks}
    for d in adapter_deltas:
        track.set_deltas(d)
        for t in tasks:
            probs[t] = probs[t] + track.logits(t, split).softmax(1)
    return {t: accuracy(probs[t], track.labels(t, split)) for t in tasks}


# The same small grid for every method's output-scale knob: the weight λ given to each input (for the
# methods whose default weight is 1/N, their default is λ = 1/N); then, at the best λ, the density where
# the method has one.
LAMBDAS = (0.25, 0.5, 1.0)
DENSITIES = (0.2, 0.5, 0.8)


@dataclass
class Candidate:
    label: str
    weights: list[float] | None
    opts: dict = field(default_factory=dict)


def density_option(method: str) -> str | None:
    names = {o.name for o in METHODS[method].options}
    return "density" if "density" in names else None


def lambda_grid(n: int) -> list[Candidate]:
    return [Candidate("default", None)] + [Candidate(f"λ={lam}", [lam] * n) for lam in LAMBDAS]


def density_grid(method: str, best: Candidate) -> list[Candidate]:
    key = density_option(method)
    if key is None:
        return []
    current = best.opts.get(key, METHODS[method].option_defaults()[key])
    return [Candidate(f"{best.label}, {key}={d}", best.weights, dict(best.opts, **{key: d})) for d in DENSITIES if d != current]
