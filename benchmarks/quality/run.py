"""Driver: train (or reuse) the task LoRAs, run the experiments, keep every measurement in
results/<track>.json, and write RESULTS.md and the plots from what is there.

    python -m benchmarks.quality.run                      # encoder track, seed 0, every experiment
    SEEDS=3 make bench-quality                            # seeds 0..2
    python -m benchmarks.quality.run --smoke              # 2 tasks, few steps, coarse checks only
    python -m benchmarks.quality.run --report             # rewrite RESULTS.md from results/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def store(path: Path, records: list[dict], new: list[dict], replace: dict) -> list[dict]:
    """Replace the records that match ``replace`` (exp, track, seed) by ``new`` and save atomically. The
    file is read again first, so that records another run wrote meanwhile are kept."""
    records = load_results(path) if path.exists() else records
    keep = [r for r in records if not all(r.get(k) == v for k, v in replace.items())]
    out = keep + new
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(path)
    return out


def make_track(name: str, tasks: dict, cache: Path):
    if name == "encoder":
        from .encoder import EncoderTrack
        return EncoderTrack(tasks, cache)
    from .decoder import DecoderTrack
    return DecoderTrack(tasks, cache)


def current_lego_default() -> dict:
    from lora_lego import METHODS
    d = METHODS["lego"].option_defaults()
    return {k: d[k] for k in ("param_reweight", "output_reweight", "canonicalize", "unit_split")}


def run_track(args, track_name: str) -> None:
    import torch
    from . import experiments as E
    from .data import TASK_NAMES, load_task

    torch.set_num_threads(args.threads)
    names = args.tasks.split(",") if args.tasks else (TASK_NAMES if track_name == "encoder" else E_DECODER_TASKS)
    sizes = dict(n_test=args.n_test, n_val=args.n_val)
    tasks = {n: load_task(n, **sizes) for n in names}
    track = make_track(track_name, tasks, Path(args.cache))
    steps = args.steps or (100 if track_name == "encoder" else 60)
    path = Path(args.results) / f"{track_name}.json"
    records = load_results(path)
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    for seed in seeds:
        t0 = time.perf_counter()
        ctx = E.Context(track, seed, args.rank, steps, log=log, known=[r for r in records if r["track"] == track_name])
        log(f"{track_name} seed {seed}: adapters ready ({time.perf_counter() - t0:.0f}s); zero-shot test "
            f"{sum(ctx.zero['test'].values()) / len(names):.3f}, individual {sum(ctx.individual['test'].values()) / len(names):.3f}")
        records = store(path, records, E.reference_records(ctx), dict(exp="ref", track=track_name, seed=seed))
        default = current_lego_default()
        for exp in filter(None, args.experiments.split(",")):
            t1 = time.perf_counter()
            keep = []
            if exp == "E1" and args.resume:
                keep = [r for r in records if r["exp"] in ("E1", "tune") and r["track"] == track_name and r["seed"] == seed]
            records = store(path, records, keep, dict(exp=exp, track=track_name, seed=seed))
            if exp == "E1":
                records = store(path, records, [r for r in keep if r["exp"] == "tune"], dict(exp="tune", track=track_name, seed=seed))

            def sink(new, _path=path):
                nonlocal records
                records = store(_path, records, new, dict(exp="__never__"))

            if exp == "E6":
                _, winner = E.e6_ablation(ctx, sink=sink)
                log(f"E6 winner on validation: {winner}")
                continue
            if exp == "E0":
                new = E.e0_permutation(ctx, default)
            elif exp == "E1":
                # resumed: a row is done when it has what this run would add (with tuning, its tuned row);
                # its default-knob test rows are reused rather than measured again
                done = {r.get("method") for r in keep if r["exp"] == "E1" and (args.no_tune or r.get("tuned") in ("val", "none"))}
                reuse = {(r["method"], r["k"] if isinstance(r["k"], int) else None): r for r in keep
                         if r["exp"] == "E1" and r.get("tuned") == "default" and not r.get("wider")}
                E.e1_multitask(ctx, default, sink=sink, skip=done, tune_knobs=not args.no_tune,
                               only=split_labels(args.methods) if args.methods else None, reuse=reuse,
                               variants=tuple(E.LEGO_VARIANTS))
                new = []
            elif exp == "E6s":
                new = E.e6_scale_probe(ctx, default)
            elif exp == "E1v":  # E1's rows for the lego variants (k = r, then 2r and 4r), other rows kept
                for v in E.LEGO_VARIANTS:
                    records = store(path, records, [], dict(exp="E1", track=track_name, seed=seed, method=v))
                    records = store(path, records, [], dict(exp="tune", track=track_name, seed=seed, row=v))
                skip = [label for label, _, _ in E.e1_methods(default)] + ["concat", "ensemble (outputs)"]
                E.e1_multitask(ctx, default, sink=sink, skip=skip, variants=tuple(E.LEGO_VARIANTS))
                new = E.e1_wider(ctx, default, records, rows=tuple(E.LEGO_VARIANTS))
            elif exp == "E6g":
                new = E.e6_gain(ctx, default)
            elif exp == "E1x":  # with --methods: only those rows, the seed's other 2r and 4r rows kept
                rows = [m for m in E.ranked_rows(default) if not args.methods or m in split_labels(args.methods)]
                for m in rows:
                    records = store(path, records, [], dict(exp="E1", track=track_name, seed=seed, wider=True, method=m))
                new = E.e1_wider(ctx, default, records, rows=tuple(rows))
            elif exp == "E4":
                lin = linear_choice(records, track_name, seed)
                new = E.e4_heterogeneous(ctx, default, steps, lin["weights"][0] if lin else None)
            elif exp == "E2":
                new = E.e2_mixed_task(ctx, default)
            elif exp == "E3":
                new = E.e3_out_of_domain(ctx, default)
            elif exp == "E5":
                new = E.e5_pruning(ctx, default)
            elif exp == "E7":
                new = E.e7_rank_sweep(ctx, default, linear_choice(records, track_name, seed))
            else:
                raise SystemExit(f"unknown experiment {exp}")
            records = store(path, records, new, dict(exp="__never__"))
            log(f"{track_name} seed {seed} {exp}: {time.perf_counter() - t1:.0f}s")


def split_labels(text: str) -> list[str]:
    """Comma-separated row labels; a comma inside parentheses belongs to the label."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in out + [cur.strip()] if x]


E_DECODER_TASKS = ["sms_spam", "trec", "bbc_news", "movie_sent"]


def linear_choice(records: list[dict], track: str, seed: int) -> dict | None:
    rows = [r for r in records if r["exp"] == "E1" and r["track"] == track and r["seed"] == seed
            and r.get("method") == "linear" and r.get("tuned") == "val"]
    if not rows or rows[0].get("chosen") in (None, "default"):
        return None
    lam = float(rows[0]["chosen"].split("=")[1].split(",")[0])
    return {"weights": [lam] * len({t for r in rows for t in r["scores"]}), "opts": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--track", default="encoder", choices=["encoder", "decoder", "both"])
    p.add_argument("--seeds", type=int, default=int(os.environ.get("SEEDS", "1")), help="run training seeds 0..N-1")
    p.add_argument("--seed-list", default="", help="comma-separated training seeds to run instead of --seeds (e.g. 1,2)")
    p.add_argument("--experiments", default="E6,E1,E0,E5,E3,E7,E2,E6s,E1x,E4",
                   help="comma-separated, run in this order (E6s: E6's scale probe; E6g: output-scale rules on E6's task sets; E1x: E1 at 2r and 4r; E1v: E1 rows of the lego variants)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: the track's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--n-test", type=int, default=200, help="test items per task")
    p.add_argument("--n-val", type=int, default=100, help="validation items per task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--results", default=str(HERE / "results"), help="folder of the <track>.json measurements")
    p.add_argument("--resume", action="store_true", help="E1: keep the methods already measured")
    p.add_argument("--no-tune", action="store_true", help="E1: default knobs only, no validation grid")
    p.add_argument("--methods", default="", help="E1, E1x: comma-separated row labels to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="2 tasks, few steps; check coarse facts and exit")
    p.add_argument("--report", action="store_true", help="only rewrite RESULTS.md and the plots")
    args = p.parse_args(argv)
    if args.smoke:
        from .smoke import smoke
        return smoke(args.cache, log)
    if not args.report:
        for t in (["encoder", "decoder"] if args.track == "both" else [args.track]):
            run_track(args, t)
    from .report import write_report
    if Path(args.results).resolve() == (HERE / "results").resolve():
        write_report(HERE, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
