"""Speed and memory benchmark of `lora-lego merge` against the I/O floor and PEFT; writes
benchmarks/speed/results/*.json, the plots and benchmarks/speed/RESULTS.md.

    python benchmarks/speed/run.py [main] [peft] [scaling] [report] [--reps 5] [--threads 1 2]

main:    8 synthetic Llama-2-7B adapters (rank 16, fp16, 7 projections x 32 layers): whole-process wall
         time and peak RSS (/usr/bin/time -v) of every method and of the I/O floor, alternating, --reps
         rounds, each with OMP_NUM_THREADS set to each of --threads.
peft:    PEFT add_weighted_adapter (svd, cat) on a 2-layer model with the same dimensions, per module,
         against lora-lego on the same adapters (benchmarks/speed/peft_compare.py).
scaling: time and peak RSS against the number of adapters, the rank and the hidden size (4 layers).
ties:    ties (dense ΔW per input, minutes per module here) with lego and linear on one layer of the set.
report:  RESULTS.md and the plots from the JSON files present (the other steps end with it too).
Adapters are generated under benchmarks/speed/data/ (git-ignored) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DATA = HERE / "data"
RESULTS = HERE / "results"
SCRATCH = DATA / "out"
PY = sys.executable
LORA_LEGO = [PY, "-m", "lora_lego.cli"]

sys.path.insert(0, str(HERE))
from make_adapters import make_set  # noqa: E402


def timed(cmd: list[str], threads: int) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS in MB."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", proc.stderr).group(1).strip()
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": seconds, "rss_mb": rss_kb / 1024}


def merge_cmd(inputs: list[Path], method: str, out: Path, rank: int | None) -> list[str]:
    cmd = [*LORA_LEGO, "merge", *map(str, inputs), "--method", method, "-o", str(out), "--force", "-q"]
    return cmd + (["--rank", str(rank)] if rank is not None else [])


def floor_cmd(inputs: list[Path], out: Path, rank: int, bare: bool = False) -> list[str]:
    return [PY, str(HERE / "io_floor.py"), *map(str, inputs), "-o", str(out), "--rank", str(rank)] + (["--no-torch"] if bare else [])


def available_methods() -> list[str]:
    out = subprocess.run([*LORA_LEGO, "methods"], capture_output=True, text=True, cwd=ROOT).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def load_load() -> float:
    return os.getloadavg()[0]


def run_configs(configs: dict[str, list[str]], reps: int, threads: int, label: str) -> dict[str, list[dict]]:
    """Every config once per round, rounds rotating the order so no config always follows the same one."""
    names = list(configs)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            shutil.rmtree(SCRATCH, ignore_errors=True)
            r = timed(configs[name], threads)
            r["load1"] = load_load()
            runs[name].append(r)
            print(f"  [{label} t={threads} round {rep + 1}/{reps}] {name:<12} {r['wall_s']:7.2f} s {r['rss_mb']:7.0f} MB  (load {r['load1']:.1f})", flush=True)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    return runs


def main_set(reps: int, threads_list: list[int]) -> None:
    inputs = make_set(DATA / "llama7b-r16", 8)
    # ties forms every dense ΔW and trims it (minutes per module here): it is measured on one layer (ties step)
    methods = [m for m in ("lego", "linear", "concat") if m in available_methods()]
    configs = {"floor": floor_cmd(inputs, SCRATCH, 16), "floor-bare": floor_cmd(inputs, SCRATCH, 16, bare=True)}
    for m in methods:
        configs[m] = merge_cmd(inputs, m, SCRATCH, 16 if m != "concat" else None)
    configs["floor-r128"] = floor_cmd(inputs, SCRATCH, 128)  # concat's output: rank 8 x 16
    result = _load_json("main") or {"by_threads": {}}  # other thread counts measured before are kept
    result.update(what="8 x Llama-2-7B shapes, rank 16, fp16, 224 modules", reps=reps)
    for t in threads_list:
        result["by_threads"][str(t)] = run_configs(configs, reps, t, "main")
        result["machine"] = machine()
        save("main", result)


def ties_layer(reps: int, threads: int) -> None:
    """ties, which forms and trims every dense ΔW, on one layer (7 modules) of 8 Llama-2-7B adapters."""
    inputs = make_set(DATA / "llama7b-1layer-r16", 8, layers=1)
    configs = {"floor": floor_cmd(inputs, SCRATCH, 16)}
    for m in ("lego", "linear", "ties"):
        configs[m] = merge_cmd(inputs, m, SCRATCH, 16)
    result = {"what": "8 x one layer of Llama-2-7B shapes (7 modules), rank 16, fp16", "reps": reps,
              "by_threads": {str(threads): run_configs(configs, reps, threads, "ties")}, "machine": machine()}
    save("ties", result)


def _load_json(name: str):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def scaling(reps: int, threads: int) -> None:
    points = []
    layers = 4
    for n in (2, 4, 8, 16, 32, 64):
        points.append(("adapters", n, dict(count=n, rank=16, hidden=4096, intermediate=11008)))
    for r in (4, 8, 16, 32, 64):
        points.append(("rank", r, dict(count=8, rank=r, hidden=4096, intermediate=11008)))
    for h in (1024, 2048, 4096, 8192):
        points.append(("hidden", h, dict(count=8, rank=16, hidden=h, intermediate=int(h * 11008 / 4096))))
    out = []
    for axis, value, spec in points:
        folder = DATA / f"scale-n{spec['count']}-r{spec['rank']}-h{spec['hidden']}-l{layers}"
        inputs = make_set(folder, spec["count"], rank=spec["rank"], hidden=spec["hidden"],
                          intermediate=spec["intermediate"], layers=layers)
        configs = {"floor": floor_cmd(inputs, SCRATCH, spec["rank"]), "lego": merge_cmd(inputs, "lego", SCRATCH, spec["rank"])}
        runs = run_configs(configs, reps, threads, f"{axis}={value}")
        out.append({"axis": axis, "value": value, "spec": spec, "layers": layers, "runs": runs})
    save("scaling", {"threads": threads, "reps": reps, "points": out, "machine": machine()})


def peft(threads: int, modules: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [PY, str(HERE / "peft_compare.py"), "--out", str(RESULTS / "peft.json"), "--modules", modules]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", nargs="*", default=["main", "peft", "scaling", "ties", "report"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scaling-reps", type=int, default=3)
    p.add_argument("--ties-reps", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--peft-modules", default="q_proj,down_proj",
                   help="projections of layer 0 that PEFT's svd merges (each takes minutes on 2 cores)")
    args = p.parse_args()
    if "main" in args.steps:
        main_set(args.reps, args.threads)
    if "peft" in args.steps:
        peft(args.threads[0], args.peft_modules)
    if "scaling" in args.steps:
        scaling(args.scaling_reps, args.threads[0])
    if "ties" in args.steps:
        ties_layer(args.ties_reps, args.threads[0])
    from report import write_report

    write_report(RESULTS, HERE)


if __name__ == "__main__":
    main()
