"""`make demo`: merge the bundled example adapters with LoRA-LEGO through the CLI and show what it did.

For each module it compares the merged update with the exact mean of the input updates (what an ideal
merge of equal-weight tasks would apply) and with each input: relative error and cosine similarity.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "synthetic"
OUT = ROOT / "demo-out" / "merged-lego"


def main() -> int:
    from lora_lego import load_adapter

    inputs = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())
    cmd = [sys.executable, "-m", "lora_lego.cli", "merge", *map(str, inputs), "-o", str(OUT), "--force"]
    print("$ lora-lego merge " + " ".join(str(p.relative_to(ROOT)) for p in inputs) + f" -o {OUT.relative_to(ROOT)} --force")
    sys.stdout.flush()
    proc = subprocess.run(cmd)
    if proc.returncode:
        return proc.returncode
    merged = load_adapter(OUT)
    adapters = [load_adapter(p) for p in inputs]
    print(f"\n{'module':<34} {'rank':>4} {'rel.err vs mean':>15}  " + "  ".join(f"cos({p.name})" for p in inputs))
    for name, spec in merged.modules.items():
        d = merged.factors(name).delta()
        deltas = [a.factors(name).delta() for a in adapters]
        mean = sum(deltas) / len(deltas)
        rel = float((d - mean).norm() / mean.norm())
        cos = [float(torch.nn.functional.cosine_similarity(d.flatten(), x.flatten(), dim=0)) for x in deltas]
        print(f"{name:<34} {spec.rank:>4} {rel:>15.3f}  " + "  ".join(f"{c:>{len(p.name) + 5}.3f}" for c, p in zip(cos, inputs)))
    print(f"\nwrote {OUT.relative_to(ROOT)}/ (PEFT format: adapter_config.json + adapter_model.safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
