"""Synthetic PEFT LoRA adapters with the real shapes of a model (default Llama-2-7B: hidden 4096,
intermediate 11008, 32 layers, LoRA on all 7 projections, rank 16, fp16).

The values are random (A rows ~ N(0, 1/d_in), B columns ~ N(0, 1/r)): timings and memory depend on the
shapes and dtype only, not on what was learned. Each adapter gets its own seed, so every merge sees
distinct units.

    python benchmarks/speed/make_adapters.py OUT_DIR --count 8 [--rank 16] [--hidden 4096] ...

writes OUT_DIR/adapter-00 ... OUT_DIR/adapter-07, each a PEFT folder (adapter_config.json +
adapter_model.safetensors). Existing adapters with the same shapes are kept (the file records them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden: int = 4096, intermediate: int = 11008, layers: int = 32) -> dict[str, tuple[int, int]]:
    """Module name -> (d_out, d_in) of every linear layer LoRA targets in a Llama block (no GQA)."""
    shapes = {}
    for i in range(layers):
        for p in ATTENTION:
            shapes[f"model.layers.{i}.self_attn.{p}"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (intermediate, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (intermediate, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (hidden, intermediate)
    return shapes


def write_adapter(path: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int,
                  dtype: torch.dtype = torch.float16, alpha: float | None = None, **config_extra) -> Path:
    """One adapter with every module of ``shapes``; ``config_extra`` goes into adapter_config.json."""
    path = Path(path)
    spec = {"shapes": {k: list(v) for k, v in shapes.items()}, "rank": rank, "seed": seed, "dtype": str(dtype),
            "config": config_extra}
    marker = path / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in shapes.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(dtype)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) / rank**0.5).to(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}), "lora_dropout": 0.0,
        "base_model_name_or_path": "synthetic-llama", "task_type": "CAUSAL_LM", "bias": "none", **config_extra,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(spec))
    return path


def make_set(out: Path, count: int, rank: int = 16, hidden: int = 4096, intermediate: int = 11008,
             layers: int = 32, dtype: torch.dtype = torch.float16, seed: int = 0) -> list[Path]:
    shapes = llama_shapes(hidden, intermediate, layers)
    return [write_adapter(Path(out) / f"adapter-{i:02d}", shapes, rank, seed + i, dtype) for i in range(count)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    for path in make_set(args.out, args.count, args.rank, args.hidden, args.intermediate, args.layers, seed=args.seed):
        print(path)


if __name__ == "__main__":
    main()
