"""Checks the decoder track's fast scoring and training loss against the plain forward, and times both.

    OMP_NUM_THREADS=1 python -m benchmarks.quality.decoder_check --n 48

Scoring: per task, the first ``--n`` test items, scored (a) the way the track scored before (batches of 16
sorted by text length, left padding, the full forward with the LM head over every position, then the last
position's label logits) and (b) by ``DecoderTrack.logits`` (shared prefix run once, right-padded suffixes,
the LM head on the last position's label rows only); for the base model and for the base plus a random
low-rank update on q_proj/v_proj. Prints items/s of each, max |logit difference| and both accuracies.
Training: the loss and the LoRA gradients of a few batches by both paths."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="test items per task")
    p.add_argument("--tasks", default="sms_spam,trec,bbc_news,movie_sent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="batch size of the fast path")
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .data import load_task
    from .decoder import TARGETS, DecoderTrack, label_logits

    names = args.tasks.split(",")
    tasks = {n: load_task(n, n_test=args.n, n_val=8) for n in names}
    track = DecoderTrack(tasks, Path(args.cache), batch=args.batch)
    g = torch.Generator().manual_seed(0)
    delta = {n: 0.02 * torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g) / 8 ** 0.5
             for n, w in track.base.items()}
    for label, d in (("base", None), ("base + random rank-8 update", delta)):
        track.set_deltas(d)
        fast, ref = {}, {}
        t0 = time.perf_counter()
        for t in names:
            fast[t] = track.logits(t, "test")
        t_fast = time.perf_counter() - t0
        n_items = sum(len(tasks[t].test) for t in names)
        line = f"{label}: fast {n_items / t_fast:.2f} items/s ({t_fast:.1f}s for {n_items})"
        if not args.skip_reference:
            t0 = time.perf_counter()
            with torch.no_grad():
                for t in names:
                    items = tasks[t].test
                    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
                    out = torch.empty(len(items), len(tasks[t].words))
                    for s in range(0, len(order), 16):
                        idx = order[s:s + 16]
                        out[idx] = track.reference_logits(track.model, t, [items[i][0] for i in idx])
                    ref[t] = out
            t_ref = time.perf_counter() - t0
            diff = max(float((fast[t] - ref[t]).abs().max()) for t in names)
            acc = {t: (float((fast[t].argmax(1) == track.labels(t, "test")).float().mean()),
                       float((ref[t].argmax(1) == track.labels(t, "test")).float().mean())) for t in names}
            same = all(bool((fast[t].argmax(1) == ref[t].argmax(1)).all()) for t in names)
            line += (f"; plain forward {n_items / t_ref:.2f} items/s ({t_ref:.1f}s); speed-up {t_ref / t_fast:.2f}x; "
                     f"max |logit diff| {diff:.2e}; same predictions: {same}; accuracy fast/plain "
                     + ", ".join(f"{t} {a:.3f}/{b:.3f}" for t, (a, b) in acc.items()))
        print(line, flush=True)
    track.set_deltas(None)
    # training: loss and gradients of the LoRA parameters, both paths, same batch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(track.base_dir(), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    for t in names[:2]:
        texts = [x for x, _ in tasks[t].test[:8]]
        y = torch.tensor([c for _, c in tasks[t].test[:8]])
        grads, losses, secs = [], [], []
        for path in ("plain", "fast"):
            model.zero_grad()
            t0 = time.perf_counter()
            if path == "plain":
                loss = F.cross_entropy(track.reference_logits(model, t, texts), y)
            else:
                prefix = track._prefix(t)
                suffixes = [i[len(prefix):] for i in track._ids(t, texts)]
                loss = F.cross_entropy(label_logits(model, prefix, suffixes, track.label_ids[t]), y)
            loss.backward()
            secs.append(time.perf_counter() - t0)
            losses.append(float(loss))
            grads.append(torch.cat([q.grad.flatten() for q in params]))
        rel = float((grads[0] - grads[1]).norm() / grads[0].norm())
        print(f"training step on {t} (batch 8): loss plain {losses[0]:.6f} fast {losses[1]:.6f}; gradient relative "
              f"difference {rel:.2e}; forward+backward {secs[0]:.2f}s plain, {secs[1]:.2f}s fast", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
