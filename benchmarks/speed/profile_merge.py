"""In-process time of one merge on the 8 x Llama-2-7B set, with the top of a cProfile of the main thread.

    python benchmarks/speed/profile_merge.py [--method lego] [--threads 1] [--reps 3] [--profile] [-- lego options]

Unlike run.py's whole-process figures, in-process times compare fairly on a machine shared with other
work (both sides see the same load); run two versions alternately with PYTHONPATH=<other checkout>/src.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lego")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=32, help="merge only the modules of the first N layers")
    p.add_argument("--profile", action="store_true", help="print the top of a cProfile of the last rep")
    p.add_argument("--no-prepare", action="store_true",
                   help="run the method's prepare step (lego: stacking and Gram products) in the main thread, "
                        "not in the reader thread, to compare")
    p.add_argument("--prefetch", action="store_true",
                   help="lego: compute the Grams in a forked child first (as the CLI does while it imports torch) "
                        "and time the merge once the child is done, so that the merge uses them")
    p.add_argument("--out", type=Path, help="also torch.save the merged float32 factors here (to compare versions)")
    args, rest = p.parse_known_args()
    options = {}
    for item in rest:  # key=value method options, e.g. canonicalize=none
        key, value = item.lstrip("-").split("=", 1)
        options[key.replace("-", "_")] = int(value) if value.isdigit() else value

    # as run.py sets it for the CLI: every thread's OpenMP team (the reader thread's too), not only the main one's
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    import lora_lego  # first: it sets thread defaults before torch and numpy load
    import torch
    from make_adapters import make_set

    torch.set_num_threads(args.threads)
    if args.no_prepare:
        import dataclasses

        from lora_lego.methods import METHODS

        METHODS[args.method] = dataclasses.replace(METHODS[args.method], prepare=None)
    print(f"imports {time.perf_counter() - t0:.2f} s ({lora_lego.__file__})")
    inputs = make_set(HERE / "data" / "llama7b-r16", 8)
    adapters = [lora_lego.load_adapter(p) for p in inputs]
    if args.layers < 32:
        keep = {n for n in adapters[0].modules if any(f".layers.{i}." in n for i in range(args.layers))}
        for a in adapters:
            a.modules = {n: s for n, s in a.modules.items() if n in keep}
    times = []
    for rep in range(args.reps):
        prof = cProfile.Profile() if args.profile and rep == args.reps - 1 else None
        prefetched = None
        if args.prefetch:
            from lora_lego import prefetch

            prefetched = prefetch.start([str(p) for p in inputs])
            t = time.perf_counter()
            done = prefetched.wait() if prefetched is not None else 0
            print(f"prefetch child {time.perf_counter() - t:.3f} s, {done} modules", flush=True)
        t, main_cpu, all_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        if prof:
            prof.enable()
        merged = lora_lego.merge(adapters, method=args.method, rank=16, gram_prefetch=prefetched, **options)
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t)
        main_cpu, all_cpu = time.thread_time() - main_cpu, time.process_time() - all_cpu
        # CPU seconds of the main thread and of the rest (the reader thread, and torch's other threads):
        # on a machine with a free core for each, the wall time tends to the larger of the two
        print(f"merge {times[-1]:.3f} s  (CPU: main thread {main_cpu:.2f} s, other threads {all_cpu - main_cpu:.2f} s)",
              flush=True)
    print(f"median {sorted(times)[len(times) // 2]:.3f} s over {len(times)} reps")
    if args.out:
        torch.save({n: (merged.factors(n).A, merged.factors(n).B) for n in merged.modules}, args.out)
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())


if __name__ == "__main__":
    main()
