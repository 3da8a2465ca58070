"""PEFT's add_weighted_adapter (combination_type "svd" and "cat") against lora-lego, per module, on a
2-layer Llama model with Llama-2-7B's dimensions (hidden 4096, intermediate 11008; PEFT needs a model).

PEFT's svd forms each module's dense ΔW and takes its full SVD (its default svd_full_matrices=True), which
takes minutes per module on 2 CPU cores, so only the projections named by --modules of layer 0 carry
LoRAs. 8 adapters of rank 16 (fp16) are merged to rank 16; every call is timed per module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_adapters import llama_shapes, write_adapter  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 11008


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--modules", default="q_proj,down_proj")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--part", choices=("both", "lora-lego", "peft"), default="both",
                   help="measure one side only, keeping the other's figures already in --out")
    args = p.parse_args()
    wanted = args.modules.split(",")
    shapes = {k: v for k, v in llama_shapes(HIDDEN, INTERMEDIATE, 2).items()
              if k.startswith("model.layers.0.") and k.rsplit(".", 1)[1] in wanted}
    folder = HERE / "data" / f"peft-2layer-{'-'.join(wanted)}"
    dirs = [write_adapter(folder / f"adapter-{i:02d}", shapes, 16, seed=100 + i,
                          layers_to_transform=[0], layers_pattern="layers") for i in range(args.count)]
    result = json.loads(args.out.read_text()) if args.out.is_file() and args.part != "both" else {}
    result.update({"modules": list(shapes), "count": args.count, "rank": 16, "threads": torch.get_num_threads()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.part != "peft":
        lora_lego_side(dirs, shapes, result)
        args.out.write_text(json.dumps(result, indent=1))
    if args.part != "lora-lego":
        peft_side(dirs, result, args.out)


def lora_lego_side(dirs: list[Path], shapes: dict, result: dict) -> None:
    """lora-lego in process, per module: a whole merge of that one module (reading, the reader thread's
    start and everything else included, so an upper bound), the median of 3 runs. Progress stamps no
    longer time single modules: modules are merged in batches, and lego's last step runs behind the next
    batch's reading."""
    from lora_lego import load_adapter, merge
    from lora_lego.methods import METHODS

    for method in [m for m in ("lego", "linear", "concat") if m in METHODS]:
        times: dict[str, list[float]] = {name: [] for name in shapes}
        for _ in range(3):
            for name in shapes:
                adapters = [load_adapter(d) for d in dirs]
                for a in adapters:
                    a.modules = {name: a.modules[name]}
                start = time.perf_counter()
                merge(adapters, method=method, rank=None if method == "concat" else 16)
                times[name].append(time.perf_counter() - start)
        result[f"lora-lego {method}"] = {name: sorted(ts)[1] for name, ts in times.items()}
        print(method, result[f"lora-lego {method}"], flush=True)


def peft_side(dirs: list[Path], result: dict, out: Path) -> None:
    """PEFT on the 2-layer model with the adapters loaded; its svd is timed per module call."""
    from peft import PeftModel
    from peft.tuners.lora.model import LoraModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.float16)
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(dirs))]

    # time every per-module call of PEFT's own merge functions
    per_module: dict[str, float] = {}
    for attr in ("_svd_generalized_task_arithmetic_weighted_adapter",):
        real = getattr(LoraModel, attr)

        def timed(self, *a, _real=real, **k):
            t = time.perf_counter()
            merged = _real(self, *a, **k)
            per_module[f"call{len(per_module)}"] = time.perf_counter() - t
            return merged

        setattr(LoraModel, attr, timed)
    for combination in ("cat", "svd"):
        per_module.clear()
        t = time.perf_counter()
        model.add_weighted_adapter(names, [1.0] * len(names), f"merged_{combination}", combination_type=combination,
                                   svd_rank=16 if combination == "svd" else None)
        total = time.perf_counter() - t
        result[f"peft {combination}"] = {"total_s": total, "per_call_s": list(per_module.values())}
        print(combination, result[f"peft {combination}"], flush=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
