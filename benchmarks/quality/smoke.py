"""Smoke mode (CI): 2 tasks, few training steps, small splits. Checks only coarse facts: on average
zero-shot < LoRA-LEGO merge <= individual LoRAs (the merge clearly above zero-shot, and not above the
individual LoRAs by more than sampling noise), and the merged adapter written to disk reloads in PEFT
and reproduces the update the benchmark scored."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

SMOKE_TASKS = ("trec", "sms_spam")
MARGIN = 0.05  # the merge must beat zero-shot by at least this much on average
NOISE = 0.02  # and may exceed the individual LoRAs' average by at most this much (sampling noise)


def smoke(cache: str | Path | None = None, log=print, steps: int = 40, n_test: int = 100) -> int:
    import torch

    from lora_lego import load_adapter, merge, save_adapter

    from .common import deltas_of, mean, score
    from .data import load_task
    from .encoder import EncoderTrack, model_dir

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tasks = {n: load_task(n, n_test=n_test, n_val=0, n_train=400) for n in SMOKE_TASKS}
    with tempfile.TemporaryDirectory() as tmp:
        track = EncoderTrack(tasks, Path(cache) if cache else Path(tmp) / "cache")
        paths = [track.train(t, seed=0, steps=steps, log=log) for t in SMOKE_TASKS]
        adapters = [load_adapter(p) for p in paths]
        zero = mean(score(track, None, list(tasks), "test"))
        individual = mean({t: score(track, deltas_of(a), [t], "test")[t] for t, a in zip(SMOKE_TASKS, adapters)})
        merged = merge(adapters, method="lego", seed=0)
        merged_acc = mean(score(track, deltas_of(merged), list(tasks), "test"))
        log(f"smoke: zero-shot {zero:.3f} < lego merge {merged_acc:.3f} <= individual {individual:.3f} (+{NOISE}) ?")
        out = Path(tmp) / "merged"
        save_adapter(merged, out, warn=None)
        # 2 tasks x 100 items: a merge can tie its inputs within sampling noise, it must not clearly beat them
        ok_order = zero + MARGIN < merged_acc <= individual + NOISE
        ok_peft = _reloads_in_peft(track, out, model_dir())
    log(f"smoke: order {'ok' if ok_order else 'FAILED'}, PEFT reload {'ok' if ok_peft else 'FAILED'} "
        f"({time.perf_counter() - t0:.0f}s)")
    return 0 if ok_order and ok_peft else 1


def _reloads_in_peft(track, adapter_dir: Path, base_dir: Path) -> bool:
    """PEFT loads the written adapter onto a fresh base model; its embeddings must equal the benchmark's
    (base weights + the merged ΔW) on a batch of test inputs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from lora_lego import load_adapter

    from .common import deltas_of

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), str(adapter_dir)).eval()
    track.set_deltas(deltas_of(load_adapter(adapter_dir)))
    task = next(iter(track.tasks))
    idx, enc = track.batches(task, "test")[0]
    with torch.no_grad():
        ours = track._forward(track.model, enc)
        theirs = track._forward(model, enc)
    return bool(torch.allclose(ours, theirs, atol=1e-4))
