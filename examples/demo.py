"""`make demo`: merge the 8 real task LoRAs under examples/minilm-tasks/ (all-MiniLM-L6-v2, one per text
classification task, trained by benchmarks/quality with seed 0) into one rank-8 adapter with LoRA-LEGO
through the CLI, then score every task with the merged adapter beside the task's own LoRA and the
zero-shot base model (the first 100 test items of each task; the full tables are in
benchmarks/quality/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "minilm-tasks"
OUT = ROOT / "demo-out" / "merged-lego"
N_TEST = 100


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from benchmarks.quality.common import deltas_of, score
    from benchmarks.quality.data import load_task
    from benchmarks.quality.encoder import EncoderTrack
    from lora_lego import load_adapter

    inputs = sorted(p for p in EXAMPLES.iterdir() if (p / "adapter_config.json").exists())
    cmd = [sys.executable, "-m", "lora_lego.cli", "merge", *map(str, inputs), "-o", str(OUT), "--force"]
    print("$ lora-lego merge " + " ".join(str(p.relative_to(ROOT)) for p in inputs) + f" -o {OUT.relative_to(ROOT)} --force")
    sys.stdout.flush()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode:
        return proc.returncode
    print(f"merged {len(inputs)} adapters in {time.perf_counter() - t0:.1f}s (including start-up)\n")

    names = [p.name for p in inputs]
    tasks = {n: load_task(n, n_test=N_TEST, n_val=0) for n in names}
    track = EncoderTrack(tasks, ROOT / "demo-out" / "cache")
    merged = load_adapter(OUT)
    zero = score(track, None, names, "test")
    mixed = score(track, deltas_of(merged), names, "test")
    own = {n: score(track, deltas_of(load_adapter(p)), [n], "test")[n] for n, p in zip(names, inputs)}
    print(f"accuracy on the first {N_TEST} test items of each task (all-MiniLM-L6-v2, verbaliser-prototype head)")
    print(f"{'task':<12} {'zero-shot':>9} {'merged (1 adapter)':>19} {'own LoRA':>9}")
    for n in names:
        print(f"{n:<12} {zero[n]:>9.3f} {mixed[n]:>19.3f} {own[n]:>9.3f}")
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print(f"{'mean':<12} {mean(zero):>9.3f} {mean(mixed):>19.3f} {mean(own):>9.3f}")
    print(f"\nwrote {OUT.relative_to(ROOT)}/ (PEFT format: adapter_config.json + adapter_model.safetensors); "
          "it loads with peft.PeftModel.from_pretrained onto the base model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
