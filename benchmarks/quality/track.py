"""What the encoder and decoder tracks share: a split's labels, and evaluation with merged updates added
to the frozen base weights (``tasks``, ``linears`` and ``base`` are set by each track)."""

from __future__ import annotations

import torch


class TrackBase:
    tasks: dict
    linears: dict[str, torch.nn.Linear]
    base: dict[str, torch.Tensor]

    def labels(self, task: str, split: str) -> torch.Tensor:
        return torch.tensor([y for _, y in getattr(self.tasks[task], split)])

    def set_deltas(self, deltas: dict[str, torch.Tensor] | None) -> None:
        """Base weights plus ΔW per module (None: the base model)."""
        unknown = set(deltas or {}) - set(self.linears)
        if unknown:
            raise KeyError(f"modules not in the model: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for n, m in self.linears.items():
                w = self.base[n]
                if deltas and n in deltas:
                    w = w + deltas[n].to(w.dtype)
                m.weight.copy_(w)
