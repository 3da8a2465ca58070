"""``lora-lego inspect --plot``: the per-module picture of one or more adapters, and for several adapters how
the rank units of one module cluster. Needs matplotlib (``pip install 'lora-lego[plot]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .adapter import Adapter
from .errors import LoraLegoError
from .stats import ModuleStats


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LoraLegoError("--plot needs matplotlib, which is not installed: pip install 'lora-lego[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def unit_projection(adapters: Sequence[Adapter], module: str, seed: int = 0):
    """The units of ``module`` pooled over the adapters that have it (canonicalised by sign, each scaled to
    unit length so that direction, not size, decides), projected on their first two principal axes; with
    the k-means centroids LoRA-LEGO would form at the largest input rank. Returns (points (n x 2), owner
    index per point, centroids (k x 2))."""
    from .kmeans import kmeans
    from .msu import pool_units

    holders = [i for i, a in enumerate(adapters) if module in a.modules]
    factors = [adapters[i].factors(module) for i in holders]
    X, _ = pool_units(factors, [1.0] * len(factors), "b", "sign")
    X = X.to(torch.float64)
    X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)
    owners = torch.cat([torch.full((f.rank,), i) for i, f in zip(holders, factors)])
    k = max(f.rank for f in factors)
    gen = torch.Generator().manual_seed(seed)
    result = kmeans(X, k, generator=gen)
    mean = X.mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(X - mean, full_matrices=False)
    axes = V[:2].T if V.shape[0] >= 2 else torch.cat([V[:1].T, torch.zeros_like(V[:1].T)], dim=1)
    return (X - mean) @ axes, owners, (result.centers - mean) @ axes


def plot_adapters(adapters: Sequence[Adapter], stats: Sequence[list[ModuleStats]], out: Path,
                  module: str | None = None) -> str | None:
    """Write a PNG: ‖ΔW‖ and effective rank per module for every adapter; with several adapters, a third panel
    with the unit clusters of ``module`` (default: the first module all of them have). Returns that module."""
    plt = _pyplot()
    several = len(adapters) > 1
    if several and module is None:
        common = [n for n in adapters[0].modules if all(n in a.modules for a in adapters)]
        module = common[0] if common else None
    if module is not None and not any(module in a.modules for a in adapters):
        raise LoraLegoError(f"--module {module} is in none of the adapters")
    panels = 3 if several and module is not None else 2
    fig, axs = plt.subplots(panels, 1, figsize=(10, 3.2 * panels))
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    index = {n: i for i, n in enumerate(names)}
    for j, (adapter, rows) in enumerate(zip(adapters, stats)):
        label = adapter.path.name if adapter.path is not None else f"adapter {j + 1}"
        xs = [index[s.name] for s in rows]
        axs[0].plot(xs, [s.norm for s in rows], "o", ms=3, label=label)
        axs[1].plot(xs, [s.effective_rank for s in rows], "o", ms=3, label=f"{label}: effective rank")
        axs[1].plot(xs, [s.rank for s in rows], "_", ms=8, color=axs[1].lines[-1].get_color())
    axs[0].set_ylabel("‖ΔW‖ (Frobenius)")
    axs[1].set_ylabel("effective rank (— = rank)")
    for ax in axs[:2]:
        ax.set_xlabel("module (in file order)")
        ax.legend(fontsize=7, loc="best")
    if panels == 3:
        points, owners, centers = unit_projection(adapters, module)
        for j, adapter in enumerate(adapters):
            sel = owners == j
            if bool(sel.any()):
                label = adapter.path.name if adapter.path is not None else f"adapter {j + 1}"
                axs[2].scatter(points[sel, 0], points[sel, 1], s=14, label=label)
        axs[2].scatter(centers[:, 0], centers[:, 1], marker="x", c="black", s=40, label="k-means centroids")
        axs[2].set_title(f"rank units of {module} (sign-canonical, unit length, first two principal axes)", fontsize=9)
        axs[2].legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise LoraLegoError(f"cannot write the plot ({e.strerror or e})", path=out) from None
    finally:
        plt.close(fig)
    return module
