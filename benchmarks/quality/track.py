"""What the encoder and decoder tracks share: a split's labels, and evaluation with merged updates added
to the frozen base weights (``tasks``, ``linears`` and ``base`` are set by each track)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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

    def fit(self, model, task: str, steps: int, batch: int, lr: float, seed: int,
            batch_loss: Callable[[list[str], torch.Tensor], torch.Tensor]) -> float:
        """AdamW over random batches of the task's training items (seeded); returns the last loss."""
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        items = self.tasks[task].train
        gen = torch.Generator().manual_seed(seed * 1000 + 7)
        for _ in range(steps):
            idx = torch.randint(len(items), (batch,), generator=gen).tolist()
            loss = batch_loss([items[i][0] for i in idx], torch.tensor([items[i][1] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()


def save_trained(model, out: Path) -> None:
    """save_pretrained under a temporary name, renamed when complete, so the cache never holds half an adapter."""
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
