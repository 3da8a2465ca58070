"""Write the small synthetic PEFT adapters under examples/synthetic/ that `make demo` merges.

Three "task" LoRAs of rank 8 on a 2-layer model (hidden 64): each task's units are noisy copies of a few
task-specific directions plus some shared ones, the structure rank-wise clustering is meant to find.
Run: python examples/make_synthetic.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, RANK = 64, 2, 8
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]


def main(out: Path = Path(__file__).parent / "synthetic") -> None:
    g = torch.Generator().manual_seed(2025)
    shared = {m: (torch.randn(4, HIDDEN, generator=g), torch.randn(HIDDEN, 4, generator=g)) for m in MODULES}
    for task in ("sentiment", "topic", "spam"):
        tensors = {}
        for m in MODULES:
            own_a, own_b = torch.randn(4, HIDDEN, generator=g), torch.randn(HIDDEN, 4, generator=g)
            A = torch.cat([shared[m][0], own_a]) + 0.1 * torch.randn(RANK, HIDDEN, generator=g)
            B = torch.cat([shared[m][1], own_b], dim=1) + 0.1 * torch.randn(HIDDEN, RANK, generator=g)
            p = torch.randperm(RANK, generator=g)  # rank order means nothing
            tensors[f"base_model.model.{m}.lora_A.weight"] = (A[p] / HIDDEN**0.5).half()
            tensors[f"base_model.model.{m}.lora_B.weight"] = (B[:, p] / 100).half()
        d = out / task
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "synthetic-2layer-64",
        }, indent=2) + "\n")
        print(f"wrote {d}")


if __name__ == "__main__":
    main()
