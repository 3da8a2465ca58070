"""RESULTS.md and plots from benchmarks/speed/results/*.json (written by run.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

FLOOR_OF = {"concat": "floor-r128"}  # the floor whose output has the method's output size


def _load(results: Path, name: str):
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _med(xs):
    return statistics.median(xs)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main_table(main: dict) -> tuple[list[str], dict]:
    lines = []
    summary = {}
    for t, runs in main["by_threads"].items():
        reps = len(next(iter(runs.values())))
        lines += [f"**OMP_NUM_THREADS={t}** ({reps} rounds, alternating; median wall time, median of the "
                  "per-round ratios to the I/O floor of the same round; peak RSS as /usr/bin/time -v reports it)", "",
                  "| process | wall time (s) | / I/O floor | peak RSS (MB) | load avg during runs |",
                  "|---|---|---|---|---|"]
        for name, rs in runs.items():
            floor = runs.get(FLOOR_OF.get(name, "floor"))
            ratio = ""
            if not name.startswith("floor") and floor:
                ratios = [r["wall_s"] / f["wall_s"] for r, f in zip(rs, floor)]
                ratio = f"{_med(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
                summary[(t, name)] = _med(ratios)
            lines.append(f"| {name} | {_med([r['wall_s'] for r in rs]):.2f} | {ratio} | "
                         f"{_med([r['rss_mb'] for r in rs]):.0f} | {_med([r['load1'] for r in rs]):.1f} |")
        lines.append("")
    return lines, summary


def plot_main(main: dict, out: Path) -> None:
    plt = _plt()
    threads = list(main["by_threads"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(main["by_threads"][threads[0]])
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        runs = main["by_threads"][t]
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [_med([r["wall_s"] for r in runs[n]]) for n in names], width, label=f"{t} thread(s)")
        axes[1].bar(xs, [_med([r["rss_mb"] for r in runs[n]]) for n in names], width, label=f"{t} thread(s)")
    for ax, title in zip(axes, ("wall time (s), median", "peak RSS (MB), median")):
        ax.set_xticks([j + width * (len(threads) - 1) / 2 for j in range(len(names))], names, rotation=30)
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")  # linear at 2 threads is ~20x the rest
    axes[0].set_title("wall time (s), median, log scale")
    axes[1].axhline(1024, color="red", lw=0.8, ls="--")
    fig.suptitle("lora-lego merge of 8 Llama-2-7B-shaped rank-16 adapters vs. the I/O floor")
    fig.tight_layout()
    fig.savefig(out / "main.png", dpi=90)
    plt.close(fig)


def peft_table(peft: dict) -> list[str]:
    mods = peft["modules"]
    lines = [f"{peft['count']} adapters of rank 16 merged to rank 16, {peft['threads']} thread(s); seconds per module "
             "(lora-lego: in-process, reading included; PEFT: the module's call inside add_weighted_adapter).", "",
             "| module (d_out x d_in) | PEFT svd | PEFT cat | lora-lego lego | lora-lego linear | lora-lego concat | svd / lego |",
             "|---|---|---|---|---|---|---|"]
    svd = peft.get("peft svd", {}).get("per_call_s", [])
    cat = peft.get("peft cat", {}).get("total_s")
    for i, m in enumerate(mods):
        row = [m]
        row.append(f"{svd[i]:.1f}" if i < len(svd) else "-")
        row.append(f"{cat / len(mods):.4f} (mean)" if cat is not None else "-")
        for k in ("lora-lego lego", "lora-lego linear", "lora-lego concat"):
            row.append(f"{peft[k][m]:.4f}" if k in peft else "-")
        row.append(f"{svd[i] / peft['lora-lego lego'][m]:.0f}x" if i < len(svd) and "lora-lego lego" in peft else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plot_peft(peft: dict, out: Path) -> None:
    plt = _plt()
    mods = peft["modules"]
    series = {}
    if "peft svd" in peft:
        series["PEFT svd"] = peft["peft svd"]["per_call_s"]
    if "peft cat" in peft:
        series["PEFT cat"] = [peft["peft cat"]["total_s"] / len(mods)] * len(mods)
    for k in ("lora-lego lego", "lora-lego linear", "lora-lego concat"):
        if k in peft:
            series[k] = [peft[k][m] for m in mods]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mods))], [m.split(".", 2)[-1] for m in mods])
    ax.set_ylabel("seconds per module (log)")
    ax.legend()
    ax.set_title("per-module merge time: PEFT add_weighted_adapter vs lora-lego")
    fig.tight_layout()
    fig.savefig(out / "peft.png", dpi=90)
    plt.close(fig)


def scaling_table(sc: dict) -> list[str]:
    lines = [f"4 layers of Llama-2-7B shapes (28 modules) unless the axis says otherwise, OMP_NUM_THREADS={sc['threads']}, "
             f"median of {sc['reps']} alternating rounds.", "",
             "| axis | value | input MB | floor (s) | lego (s) | lego / floor | lego - floor (s) | lego peak RSS (MB) | floor peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sc["points"]:
        f, lg = p["runs"]["floor"], p["runs"]["lego"]
        s = p["spec"]
        per = 2 * p["layers"] * s["rank"] * (4 * 2 * s["hidden"] + 3 * (s["hidden"] + s["intermediate"]))
        mb = per * s["count"] / 2**20
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(lg, f)]
        lines.append(f"| {p['axis']} | {p['value']} | {mb:.0f} | {_med([r['wall_s'] for r in f]):.2f} | "
                     f"{_med([r['wall_s'] for r in lg]):.2f} | {_med(ratios):.2f}x | "
                     f"{_med([a['wall_s'] - b['wall_s'] for a, b in zip(lg, f)]):.2f} | "
                     f"{_med([r['rss_mb'] for r in lg]):.0f} | {_med([r['rss_mb'] for r in f]):.0f} |")
    return lines + [""]


def plot_scaling(sc: dict, out: Path) -> None:
    plt = _plt()
    axes_names = ["adapters", "rank", "hidden"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for j, axis in enumerate(axes_names):
        pts = [p for p in sc["points"] if p["axis"] == axis]
        xs = [p["value"] for p in pts]
        for key, style in (("lego", "o-"), ("floor", "s--")):
            axes[0, j].plot(xs, [_med([r["wall_s"] for r in p["runs"][key]]) for p in pts], style, label=key)
            axes[1, j].plot(xs, [_med([r["rss_mb"] for r in p["runs"][key]]) for p in pts], style, label=key)
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel({"adapters": "number of adapters", "rank": "rank", "hidden": "hidden size"}[axis])
            axes[i, j].legend()
        axes[0, j].set_ylabel("wall time (s)")
        axes[1, j].set_ylabel("peak RSS (MB)")
    fig.suptitle("lora-lego lego vs. I/O floor: scaling (4 layers of Llama shapes)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=90)
    plt.close(fig)


def write_report(results: Path, out: Path) -> None:
    main, peft, sc = _load(results, "main"), _load(results, "peft"), _load(results, "scaling")
    ties = _load(results, "ties")
    md = ["# Speed and memory: results", "",
          "Written by `python benchmarks/speed/run.py` (see its docstring); the raw numbers are in `results/*.json`. "
          "Every figure below was measured on the machine named at the end, which **other work shared** while it "
          "ran (other sessions training and benchmarking on the same 2 cores; the 1-minute load average of each "
          "run is recorded): absolute seconds are therefore inflated and noisy, and the ratios measured in the "
          "same run, alternating, are the robust figures.", ""]
    if main:
        lines, summary = main_table(main)
        plot_main(main, out)
        md += ["## 8 adapters with Llama-2-7B shapes", "",
               f"{main['what']}: 8 x 76 MB of fp16 factors read, one rank-16 adapter (76 MB) written. "
               "`floor` reads every input tensor into torch tensors and writes and fsyncs an output of the "
               "rank-16 output's size (`io_floor.py`); `floor-bare` does the same without importing torch; "
               "`floor-r128` writes concat's 8x larger output. Output rank 16 for lego, linear and ties; "
               "concat is exact at rank 128. Inputs are in the page cache (warm), the harder case for the ratio.", "",
               *lines, "![main](main.png)", ""]
    if ties:
        lines, _ = main_table(ties)
        md += ["## ties, on one layer", "",
               f"{ties['what']}: ties forms every input's dense ΔW and trims it by magnitude, so it is "
               "measured on one layer only, beside lego and linear on the same inputs and the floor.", "", *lines]
    if peft:
        plot_peft(peft, out)
        md += ["## Against PEFT add_weighted_adapter", "", *peft_table(peft), "![peft](peft.png)", ""]
    if sc:
        plot_scaling(sc, out)
        md += ["## Scaling", "", *scaling_table(sc), "![scaling](scaling.png)", ""]
    m = (main or sc or {}).get("machine")
    if m:
        md += ["## Machine", "", f"{m['cores']} cores ({m['cpu']}), shared with other work; torch {m['torch']}, "
               f"Python {m['python']}; measured {m['date']}.", ""]
    notes = out / "NOTES.md"
    if notes.is_file():
        md += [notes.read_text()]
    (out / "RESULTS.md").write_text("\n".join(md))
