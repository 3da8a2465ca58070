"""RESULTS.md and the PNG plots, written only from the measurements kept in results/*.json."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

TRACK_INFO = {
    "encoder": "all-MiniLM-L6-v2 (22.7M parameters) with the verbaliser-prototype head; LoRA r=8, alpha=16 on "
               "query/key/value/attention-output/intermediate/output of the 6 layers (36 modules); AdamW lr 1e-3, "
               "100 steps of batch 16, max 64 tokens",
    "decoder": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32) with rank classification over the first token "
               "of each label word; LoRA r=8, alpha=16 on q_proj/v_proj; AdamW lr 1e-3, 60 steps of batch 8",
}
# How the encoder records came to be: the runs, in order, each adding its records to results/encoder.json
# (replacing those of the same experiment and seed).
ENCODER_RUNS = {"encoder": (
    "Training seed 0's task adapters are the ones committed under `examples/minilm-tasks/` (copied into the "
    "cache as `<task>-r8-s0-st100`); seeds 1 and 2 were trained by the runs below. The validation ablations "
    "E6 and E6s ran on seed 0 only, first, with the code of their time (`--seeds 1 --experiments E6`, which "
    "chose `norm_rms`, then `E6s`), then `E6g` on seed 0 (which made `norm_geo` the default). The test tables "
    "were then measured with today's default LoRA-LEGO (`output_reweight=norm_geo, canonicalize=direction, "
    "param_reweight=joint, unit_split=b`, the rows `lego (default)`) by "
    "`OMP_NUM_THREADS=1 python -m benchmarks.quality.run --track encoder --threads 1` with, in this order: "
    "`--seed-list 1,2 --experiments E1,E1x`; for seed 0 only the LoRA-LEGO rows, because the other methods' "
    "seed-0 rows from the earlier run reproduce bit for bit with today's code (checked for ties, dare_ties and "
    "average: identical per-task test scores): `--seed-list 0 --experiments E1 --resume --methods "
    "\"lego (default),lego (paper config),lego (norm_rms, previous default)\"` and `--seed-list 0 --experiments "
    "E1x --methods \"<those three>,average,dare_linear,dare_ties,magnitude_prune\"`; then `--seed-list 0 "
    "--experiments E3`, `--seed-list 1,2 --experiments E6g`, `--seed-list 0 --experiments E4`, `E2` and `E7` "
    "one after the other, then `--seed-list 1,2 --experiments E3` and `--seed-list 1,2 --experiments E2`. Rows labelled `norm_rms, previous default` are LoRA-LEGO with `output_reweight=norm_rms` "
    "(the default before `norm_geo`), otherwise the same; in the experiments not re-run since (see Not run) "
    "they are the earlier run's `lego (default)` rows. Test and validation sizes are the command's defaults "
    "(`--n-test 200 --n-val 100`).")}
COMMANDS = {
    "encoder": "python -m benchmarks.quality.run --track encoder --seeds {seeds} --experiments {exps}",
    "decoder": "python -m benchmarks.quality.run --track decoder --seeds {seeds} --experiments {exps}",
}


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pm(xs, digits=3) -> str:
    xs = list(xs)
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def short(t: str) -> str:
    return t.replace("_sent", "").replace("_", " ")


class Track:
    def __init__(self, name: str, records: list[dict]):
        self.name = name
        self.records = records
        self.seeds = sorted({r["seed"] for r in records})
        refs = [r for r in records if r["exp"] == "ref"]
        self.tasks = list(refs[0]["scores"]) if refs else []

    def ref(self, method: str, split: str = "test") -> dict[int, dict]:
        return {r["seed"]: r["scores"] for r in self.records if r["exp"] == "ref" and r["method"] == method and r["split"] == split}

    def exp(self, name: str) -> list[dict]:
        return [r for r in self.records if r["exp"] == name]


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def grouped(recs: list[dict], key) -> dict:
    g = defaultdict(list)
    for r in recs:
        g[key(r)].append(r)
    return g


def section_reference(T: Track) -> str:
    zs, ind = T.ref("zero-shot"), T.ref("individual")
    rows = []
    for label, d in (("zero-shot (base model)", zs), ("individual task LoRA", ind)):
        rows.append([label, str(len(d))] + [pm([d[s][t] for s in d]) for t in T.tasks] + [pm([mean(d[s].values()) for s in d])])
    return table(["", "seeds", *map(short, T.tasks), "mean"], rows)


def section_e0(T: Track) -> str:
    recs = T.exp("E0")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: r["method"])
    rows = []
    for m, rs in g.items():
        per_seed = grouped(rs, lambda r: r["seed"])
        per_task = {t: [r["scores"][t] for r in rs if r["task"] == t] for t in T.tasks}
        rows.append([m, n_seeds(rs)] + [pm(per_task[t]) for t in T.tasks] + [pm([mean(r["scores"][r["task"]] for r in v) for v in per_seed.values()])])
    return table(["method (LoRA + rank-permuted copy)", "seeds", *map(short, T.tasks), "mean"], rows)


def n_seeds(rs: list[dict]) -> str:
    return str(len({r["seed"] for r in rs}))


def chosen_label(rs: list[dict]) -> str:
    """The knobs chosen on validation, per seed when the seeds chose differently."""
    per = sorted({(r["seed"], r.get("chosen", "")) for r in rs})
    labels = {c for _, c in per}
    if len(labels) == 1:
        return labels.pop()
    return "; ".join(f"seed {s}: {c}" for s, c in per)


def e1_groups(T: Track) -> dict:
    """E1's records grouped by (row, k, knobs). A tuned row whose every seed kept the defaults is the
    default row itself, so it is folded into it (labelled so); otherwise the tuned row has every seed."""
    recs = T.exp("E1")
    g = grouped(recs, lambda r: (r["method"], str(r["k"]), r["tuned"]))
    out = {}
    for (m, k, tuned), rs in g.items():
        if tuned == "val" and not any(r.get("wider") for r in rs) and (m, k, "default") in g \
                and all(r.get("chosen") == "default" for r in rs) \
                and {r["seed"] for r in rs} == {r["seed"] for r in g[(m, k, "default")]}:
            continue
        label = tuned
        if tuned == "default":
            val = g.get((m, k, "val"), [])
            if val and all(r.get("chosen") == "default" for r in val) and {r["seed"] for r in val} == {r["seed"] for r in rs}:
                label = "default (also chosen on val)"
        elif tuned == "val":
            label = f"val ({chosen_label(rs)})"
        out[(m, k, label)] = rs
    return out


def section_e1(T: Track) -> str:
    if not T.exp("E1"):
        return "not run"
    ind = T.ref("individual")
    rows = []
    order = lambda kv: (kv[0][1].isdigit() and int(kv[0][1]) or 0, -mean(mean(r["scores"].values()) for r in kv[1]))  # noqa: E731
    for (m, k, knobs), rs in sorted(e1_groups(T).items(), key=order):
        means = [mean(r["scores"].values()) for r in rs]
        norm = [mean(r["scores"][t] / ind[r["seed"]][t] for t in T.tasks) for r in rs]
        secs = [r["merge_s"] for r in rs if r.get("merge_s") is not None]
        rows.append([m, k, knobs, n_seeds(rs)]
                    + [pm([r["scores"][t] for r in rs]) for t in T.tasks]
                    + [f"**{pm(means)}**", pm(norm), f"{mean(secs):.2f}" if secs else "-"])
    return table(["method", "rank k", "knobs", "seeds", *map(short, T.tasks), "mean", "mean / individual", "merge s"], rows)


def e1_summary(T: Track, rank: int = 8) -> str:
    """The headline: each ranked method's test mean at k = r (defaults, and knobs chosen on validation)
    and at 2r and 4r (the knobs chosen at r), mean ± std over seeds, best tuned k = r first."""
    recs = [r for r in T.exp("E1") if str(r["k"]).isdigit()]
    if not recs:
        return ""
    g = grouped(recs, lambda r: r["method"])
    cols = [("default", rank), ("val", rank), ("val", 2 * rank), ("val", 4 * rank)]
    rows = []
    for m, rs in g.items():
        sels = [[r for r in rs if r["tuned"] == tuned and int(r["k"]) == k] for tuned, k in cols]
        most = max(len({r["seed"] for r in sel}) for sel in sels)
        cells = []
        for sel in sels:  # a cell with fewer seeds than its row says how many
            n = len({r["seed"] for r in sel})
            cells.append(pm([mean(r["scores"].values()) for r in sel]) + (f" ({n} seed{'s' if n > 1 else ''})" if 0 < n < most else ""))
        if cells[1] == "-":
            continue
        rows.append([m] + cells + [str(most)])
    if not rows:  # no knobs were tuned (a --no-tune run): the full table says it all
        return ""
    rows.sort(key=lambda x: -float(x[2].split()[0]))
    return ("Summary (test mean over the tasks, mean ± std over training seeds; `tuned` = the input weight λ and "
            "density chosen on validation at k = r, kept at 2r and 4r; the full table below has each task, the "
            "chosen knobs per seed and the exact methods):\n\n"
            + table(["method", f"default, k = r = {rank}", "tuned, k = r", f"tuned, k = 2r = {2 * rank}",
                     f"tuned, k = 4r = {4 * rank}", "seeds"], rows) + "\n\n")


def section_e2(T: Track) -> str:
    recs = T.exp("E2")
    if not recs:
        return "not run"
    info = [r for r in recs if r["method"] == "retrieval recall"]
    g = grouped([r for r in recs if "scores" in r], lambda r: r["method"])
    rows = []
    for label, method in (("zero-shot", "zero-shot"), ("individual (oracle: the input's own LoRA)", "individual")):
        d = T.ref(method)
        rows.append([label, str(len(d))] + [pm([d[s][t] for s in d]) for t in T.tasks] + [pm([mean(d[s].values()) for s in d]), "-"])
    for m, rs in g.items():
        rows.append([m + " of the top 3", n_seeds(rs)] + [pm([r["scores"][t] for r in rs]) for t in T.tasks]
                    + [f"**{pm([mean(r['scores'].values()) for r in rs])}**", f"{mean(r['merge_s'] for r in rs):.2f}"])
    head = ""
    if info:
        head = (f"Retrieval recall (the input's own task among the 3 retrieved): {pm([r['recall'] for r in info])}; "
                f"distinct sets of 3 merged, per seed: {', '.join(str(r['groups']) for r in info)}. Methods at their default knobs.\n\n")
    return head + table(["method", "seeds", *map(short, T.tasks), "mean", "merge s per set"], rows)


def section_e3(T: Track) -> str:
    recs = T.exp("E3")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: r["method"])
    rows = []
    for m, rs in g.items():
        rows.append([m, n_seeds(rs)] + [pm([r["scores"][t] for r in rs if r["task"] == t]) for t in T.tasks]
                    + [pm([mean(r["scores"][r["task"]] for r in v) for v in grouped(rs, lambda r: r["seed"]).values()])])
    return table(["merge of the other tasks → held-out task", "seeds", *map(short, T.tasks), "mean"], rows)


def section_e4(T: Track) -> str:
    recs = T.exp("E4")
    if not recs:
        return "not run"
    ind = [r for r in recs if r["method"] == "individual"]
    merged = [r for r in recs if r["method"] != "individual"]
    tasks = list(merged[0]["scores"]) if merged else []
    rows = []
    if ind:
        rows.append(["individual LoRAs of those ranks", "-", n_seeds(ind)] + [pm([r["scores"][t] for r in ind if r["task"] == t]) for t in tasks]
                    + [pm([mean(r["scores"][r["task"]] for r in v) for v in grouped(ind, lambda r: r["seed"]).values()])])
    for (m, kind), rs in grouped(merged, lambda r: (r["method"], r["inputs"])).items():
        rows.append([m, kind, n_seeds(rs)] + [pm([r["scores"][t] for r in rs]) for t in tasks] + [f"**{pm([mean(r['scores'].values()) for r in rs])}**"])
    return ("Merged at k = 8; ranks per task: " + ", ".join(f"{short(t)} r={r}" for t, r in
            zip(tasks, [int(x) for x in merged[0]["inputs"].split()[1].split("/")])) + ".\n\n"
            + table(["method", "inputs", "seeds", *map(short, tasks), "mean"], rows)) if merged else "not run"


def section_e5(T: Track) -> str:
    recs = T.exp("E5")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: (r["method"], r["k"]))
    rows = []
    for (m, k), rs in sorted(g.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        per_seed = grouped(rs, lambda r: r["seed"])
        rows.append([m, str(k), n_seeds(rs)] + [pm([r["retention"] for r in rs if r["task"] == t]) for t in T.tasks]
                    + [f"**{pm([mean(r['retention'] for r in v) for v in per_seed.values()])}**"])
    return table(["pruning method", "rank k", "seeds", *map(short, T.tasks), "mean retention"], rows)


def section_e6(T: Track) -> str:
    recs = T.exp("E6")
    if not recs:
        return "not run"
    parts = []
    s1 = grouped([r for r in recs if r["stage"] == 1], lambda r: r["label"])
    rows = sorted(([lbl, pm([mean(r["scores"].values()) for r in rs])] for lbl, rs in s1.items()),
                  key=lambda x: -float(x[1].split()[0]))
    parts.append("Stage 1: every configuration merging all tasks at k = r, validation mean accuracy "
                 f"({len(rows)} configurations, best first; unit_split=b, n_init=10):\n\n" + table(["configuration", "val mean"], rows))
    s1_mean = {lbl: mean(mean(r["scores"].values()) for r in rs) for lbl, rs in s1.items()}
    s2 = [r for r in recs if r["stage"] == 2]
    if s2:
        sets = []
        for r in s2:
            key = ",".join(r["tasks"])
            if key not in sets:
                sets.append(key)
        g = grouped(s2, lambda r: r["label"])
        rows = []
        for lbl, rs in g.items():
            cells = [s1_mean[lbl]] + [mean(mean(r["scores"].values()) for r in rs if ",".join(r["tasks"]) == s) for s in sets]
            rows.append([lbl, *(f"{c:.3f}" for c in cells), f"**{mean(cells):.3f}**"])
        rows.sort(key=lambda x: -float(x[-1].strip("*")))
        names = [f"all {len(T.tasks)}"] + [" + ".join(map(short, s.split(","))) for s in sets]
        parts.append("Stage 2: the finalists (stage 1's best and the paper's configuration) on task sets of every size, "
                     "validation mean accuracy per set; the winner has the best average over the sets:\n\n"
                     + table(["configuration", *names, "average"], rows))
    s3 = [r for r in recs if r["stage"] == 3]
    if s3:
        winner = {k: v for k, v in s3[0]["config"].items() if k != "n_init"}
        first = s1.get(", ".join(f"{k}={v}" for k, v in winner.items()), [])
        g = grouped(s3, lambda r: r["config"]["n_init"])
        rows = []
        for n, rs in sorted(g.items()):
            vals = [mean(r["scores"].values()) for r in rs] + ([mean(r["scores"].values()) for r in first] if n == 10 else [])
            rows.append([str(n), ", ".join(f"{v:.3f}" for v in vals), pm(vals), f"{mean(r['merge_s'] for r in rs):.2f}"])
        parts.append("Stage 3: the winner's k-means restarts (n_init) and k-means seeds (validation mean; n_init = 10 "
                     "includes stage 1's run):\n\n" + table(["n_init", "per k-means seed", "mean ± std", "merge s"], rows))
    probe = T.exp("E6s")
    if probe:
        g = grouped(probe, lambda r: ",".join(r["tasks"]))
        lams = sorted({r["lam"] for r in probe})
        rows = []
        for key, rs in g.items():
            name = f"all {len(T.tasks)}" if len(rs[0]["tasks"]) == len(T.tasks) else " + ".join(map(short, rs[0]["tasks"]))
            rows.append([name] + [pm([mean(r["scores"].values()) for r in rs if r["lam"] == lam]) for lam in lams])
        parts.append("Scale probe (run when `norm_rms` was the default, before `norm_geo` replaced it; validation): "
                     "LoRA-LEGO with `output_reweight=norm_rms` and every input weighted λ > 1, i.e. the merged update "
                     "scaled to λ times the RMS of the inputs' norms (λ = 1 is `norm_rms` itself, in the tables "
                     "above):\n\n"
                     + table(["task set", *(f"λ={lam}" for lam in lams)], rows))
    gain_all = T.exp("E6g")
    gain = [r for r in gain_all if r["seed"] == min((r["seed"] for r in gain_all), default=0)]
    if gain:
        rules = list(dict.fromkeys(r["rule"] for r in gain))
        g = grouped(gain, lambda r: ",".join(r["tasks"]))
        rows, cols = [], {rule: [] for rule in rules}
        for key, rs in g.items():
            name = f"all {len(T.tasks)}" if len(rs[0]["tasks"]) == len(T.tasks) else " + ".join(map(short, rs[0]["tasks"]))
            cells = []
            for rule in rules:
                v = mean(mean(r["scores"].values()) for r in rs if r["rule"] == rule)
                cols[rule].append(v)
                cells.append(f"{v:.3f}")
            rows.append([name, *cells])
        n0 = len(subsets_of_seed0(T))
        rows.append([f"**average, stage 2's {n0} sets**", *(f"**{mean(cols[rule][:n0]):.3f}**" for rule in rules)])
        rows.append([f"**average, all {len(rows) - 1} sets**", *(f"**{mean(cols[rule]):.3f}**" for rule in rules)])
        parts.append("Output-scale rules without fitted constants (run after the scale probe; validation), everything "
                     "else at the default (`joint`, `direction`): `norm_rms` scales the merged update to the RMS of "
                     "the inputs' update norms, `norm_gain` to rms² / ‖mean update‖ (rms for identical inputs, up to "
                     "rms·sqrt(N) for orthogonal ones), `norm_geo` to sqrt(rms · gain). Training seed "
                     f"{gain[0]['seed']}; the first 5 sets are stage 2's; "
                     "the others are the 4- and 2-task sets drawn with subset seeds 1 and 2:\n\n"
                     + table(["task set", *rules], rows))
        per_seed = grouped(gain_all, lambda r: r["seed"])
        if len(per_seed) > 1:
            rows, avgs, eights = [], {rule: [] for rule in rules}, {rule: [] for rule in rules}
            for seed, rs in sorted(per_seed.items()):
                sets = grouped(rs, lambda r: ",".join(r["tasks"]))
                cells = []
                for rule in rules:
                    vals = {key: mean(mean(r["scores"].values()) for r in v if r["rule"] == rule) for key, v in sets.items()}
                    full = [v for key, v in vals.items() if len(key.split(",")) == len(T.tasks)]
                    avgs[rule].append(mean(vals.values()))
                    eights[rule].extend(full)
                    cells.append(f"{mean(vals.values()):.3f} / {full[0]:.3f}" if full else f"{mean(vals.values()):.3f}")
                wins = sum(max(rules, key=lambda rule: mean(mean(r["scores"].values()) for r in v if r["rule"] == rule)) == "norm_geo"
                           for v in sets.values()) if "norm_geo" in rules else 0
                rows.append([str(seed), str(len(sets)), *cells, str(wins)])
            rows.append(["**mean ± std over seeds**", "-", *(f"**{pm(avgs[rule])} / {pm(eights[rule])}**" for rule in rules), "-"])
            parts.append("The same comparison for every training seed run (each seed draws its own task sets: all "
                         f"{len(T.tasks)} tasks plus the distinct 4- and 2-task sets of three subset seeds; validation): the average over "
                         f"that seed's sets / the all-{len(T.tasks)}-task set, and on how many sets `norm_geo` scored "
                         "highest (ties go to the first rule listed):\n\n"
                         + table(["training seed", "task sets", *rules, "sets where norm_geo is best"], rows))
    return "\n\n".join(parts)


def subsets_of_seed0(T: Track) -> list[list[str]]:
    from .experiments import subsets
    return subsets(T.tasks, 0)


def section_e7(T: Track, out: Path) -> str:
    recs = T.exp("E7")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: (r["method"], r["k"]))
    rows = [[m, str(k), n_seeds(rs), pm([mean(r["scores"].values()) for r in rs]), f"{mean(r['merge_s'] for r in rs):.2f}"]
            for (m, k), rs in sorted(g.items())]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for m in sorted({r["method"] for r in recs}):
            ks = sorted({r["k"] for r in recs if r["method"] == m})
            ax1.plot(ks, [mean(mean(r["scores"].values()) for r in g[(m, k)]) for k in ks], "o-", label=m)
            ax2.plot(ks, [mean(r["merge_s"] for r in g[(m, k)]) for k in ks], "o-", label=m)
        zs = T.ref("zero-shot")
        ax1.axhline(mean(mean(v.values()) for v in zs.values()), color="grey", ls=":", label="zero-shot")
        ind = T.ref("individual")
        ax1.axhline(mean(mean(v.values()) for v in ind.values()), color="black", ls="--", label="individual")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("output rank k")
        ax1.set_ylabel("test mean accuracy")
        ax2.set_ylabel("merge seconds (shared CPU)")
        ax1.legend(fontsize=7)
        fig.suptitle(f"E7 rank sweep, {T.name} track")
        fig.tight_layout()
        png = out / f"e7_rank_sweep_{T.name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        plot = f"\n\n![E7 rank sweep]({png.name})"
    except ImportError:
        plot = "\n\n(plot not drawn: matplotlib is not installed)"
    return table(["method", "k", "seeds", "test mean", "merge s"], rows) + plot


def plot_e1(T: Track, out: Path) -> str:
    recs = [r for r in T.exp("E1") if r["tuned"] in ("default", "none")]
    if not recs:
        return ""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    g = grouped([r for r in recs if str(r["k"]) in ("8", "exact", "N models") or not str(r["k"]).isdigit()], lambda r: r["method"])
    g.update(grouped([r for r in T.exp("E1") if r["tuned"] == "val" and r.get("chosen") != "default"
                      and (str(r["k"]) == "8" or not str(r["k"]).isdigit())],
                     lambda r: r["method"] + " (tuned: " + r.get("chosen", "") + ")"))
    items = sorted(((m, mean(mean(r["scores"].values()) for r in rs)) for m, rs in g.items()), key=lambda x: x[1])
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(items) + 1.2))
    ax.barh([m for m, _ in items], [v for _, v in items], color="tab:blue")
    for label, method in (("zero-shot", "zero-shot"), ("individual", "individual")):
        d = T.ref(method)
        ax.axvline(mean(mean(v.values()) for v in d.values()), ls="--", color="grey")
    ax.set_xlabel("test mean accuracy over the tasks (k = r where a rank is chosen)\ndashed: zero-shot (left), individual LoRAs (right)")
    ax.set_xlim(left=max(0.0, min(v for _, v in items) - 0.1))
    fig.tight_layout()
    png = out / f"e1_methods_{T.name}.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return f"![E1 methods]({png.name})\n\n"


PAPER = """The paper's own figures (Llama-2-7B, 7 in-domain + 2 out-of-domain tasks; **a different model and task
set, not comparable number for number**): average accuracy LoRA-LEGO 62.21, TIES 58.30, task arithmetic
54.77; a later paper re-ran the setting: output ensemble 56.84, weight averaging 47.17. Pruning one LoRA to half
its rank kept about 92% of its performance. A reproduction on DeBERTa-v3 over 6 GLUE tasks found LoRA-LEGO
65.4 ± 2.8 against linear fusion 59.4 and ensemble 53.0."""


def write_report(here: Path, log=print) -> Path:
    tracks = []
    for name in ("encoder", "decoder"):
        p = here / "results" / f"{name}.json"
        if p.exists():
            tracks.append(Track(name, json.loads(p.read_text())))
    notes = here / "NOTES.md"
    lines = ["# Quality benchmark results", "",
             "Written by `python -m benchmarks.quality.run --report` from `benchmarks/quality/results/*.json`; every "
             "number below was measured by the command shown with it. Accuracies are on the test split unless "
             "a table says validation; every tuned knob was chosen on the validation split (carved from the "
             "training pool, disjoint from test). `a ± b` is the mean and standard deviation over training seeds; "
             "a single number means one seed. Timings were taken on 2 CPU cores shared with other jobs.", ""]
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for T in tracks:
        exps = sorted({r["exp"] for r in T.records if r["exp"] not in ("ref", "tune")})
        if any(r.get("wider") for r in T.records):
            exps.append("E1x")
        cmd = COMMANDS[T.name].format(seeds=len(T.seeds), exps=",".join(exps))
        refs = [r for r in T.records if r["exp"] == "ref" and r.get("sizes")]
        sizes = ""
        if refs:
            sz = refs[0]["sizes"]
            sizes = (f"; {min(v['test'] for v in sz.values())} test and {min(v['val'] for v in sz.values())} "
                     "validation items per task, the training pool disjoint from both")
        meta_path = here / "results" / f"{T.name}-run.json"
        if meta_path.exists():  # a run with non-default settings says so itself
            meta = json.loads(meta_path.read_text())
            head = [meta["info"] + sizes + ".", "", f"Seeds run: {', '.join(map(str, T.seeds))}. Command: "
                    f"`{meta['command']}`. {meta.get('note', '')}".rstrip(), ""]
        else:
            per_exp = {e: sorted({r["seed"] for r in T.records if r["exp"] == e or (e == "E1x" and r.get("wider"))}) for e in exps}
            head = [TRACK_INFO[T.name].rstrip(";") + sizes + ".", "",
                    f"Seeds run: {', '.join(map(str, T.seeds))}; per experiment: "
                    + "; ".join(f"{e} {', '.join(map(str, v))}" for e, v in per_exp.items()) + ". "
                    + ENCODER_RUNS.get(T.name, f"Command: `{cmd}`."), ""]
        lines += [f"## {T.name.capitalize()} track", ""] + head + [
                  "### Reference: zero-shot base model and each task's own LoRA", "", section_reference(T), ""]
        sections = [("E0", lambda: [
                  "### E0 permutation merging (paper's Table 1)", "",
                  "Each task LoRA merged with a copy of itself whose rank units are permuted; accuracy on that task.", "",
                  section_e0(T), ""]),
                  ("E1", lambda: ["### E1 multi-task merging, all tasks", "",
                  "One merged adapter scored on every task. `knobs`: `default` = the method's own defaults, "
                  "`val (...)` = the input weight λ chosen on validation at k = r from the same grid for every "
                  "method (the method's default, λ ∈ {0.25, 0.5, 1}), then, at that λ, the density where the method "
                  "has one (∈ {0.2, 0.5, 0.8}). `mean / individual` = accuracy normalised by each task's own LoRA. "
                  "Exact methods (concat, the output ensemble) have no rank budget and are marked as such.", "",
                  e1_summary(T) + plot_e1(T, here) + section_e1(T), ""]),
                  ("E2", lambda: ["### E2 mixed-task: each input retrieves 3 LoRAs, which are merged for it", "",
                  "Each test input's base-model embedding is compared with each task's key (the mean base embedding "
                  "of 100 of its training items); the 3 closest task LoRAs are merged and the input is scored "
                  "with its own task's head.", "", section_e2(T), ""]),
                  ("E3", lambda: ["### E3 out-of-domain: merge the other tasks, score the held-out one", "", section_e3(T), ""]),
                  ("E4", lambda: ["### E4 heterogeneous ranks", "", section_e4(T), ""]),
                  ("E5", lambda: ["### E5 pruning one LoRA (retention = pruned / original accuracy on its task)", "",
                                  section_e5(T), ""]),
                  ("E6", lambda: ["### E6 ablations (validation split only)", "", section_e6(T), ""]),
                  ("E7", lambda: ["### E7 rank sweep", "", section_e7(T, here), ""])]
        for e, make in sections:  # a section only for an experiment that was run; the rest are listed under Not run
            if e in exps:
                lines += make()
    run = {T.name: sorted({r["exp"] for r in T.records}) for T in tracks}
    missing = []
    for name in ("encoder", "decoder"):
        for e in ("E0", "E1", "E2", "E3", "E4", "E5", "E6", "E7"):
            if e not in run.get(name, []):
                missing.append(f"{name} {e}")
    extra = []
    for T in tracks:
        for e in ("E0", "E1", "E2", "E3", "E4", "E5", "E6", "E6s", "E6g", "E7"):
            have = {r["seed"] for r in T.exp(e)}
            if have and len(have) < 3:
                extra.append(f"{T.name} {e}: training seeds {', '.join(str(s) for s in range(3) if s not in have)} "
                             f"(only seed{'s' if len(have) > 1 else ''} {', '.join(map(str, sorted(have)))})")
        for e in ("E0", "E1", "E2", "E3", "E4", "E5", "E7"):
            methods = {r.get("method", "") for r in T.exp(e)}
            if any("previous default" in m for m in methods) and not any(m.startswith("lego") and "(default)" in m for m in methods):
                extra.append(f"{T.name} {e}: LoRA-LEGO with today's default (only the earlier run's `norm_rms` rows exist)")
        ranked = {r["method"] for r in T.exp("E1") if str(r["k"]).isdigit()}
        wider = {r["method"] for r in T.exp("E1") if r.get("wider")}
        if ranked - wider:
            extra.append(f"{T.name} E1 at 2r and 4r for {', '.join(sorted(ranked - wider))}")
    if "decoder" not in run:
        extra.append("the decoder track's code (benchmarks/quality/decoder.py) was exercised only on a toy run "
                     "(2 tasks, 3 training steps, 16 items) to check that it trains, merges and scores; it has no results")
    lines += ["## Not run", "", ("Not run (no measurements exist for these): " + ", ".join(missing) + ".") if missing else "Everything was run.", ""]
    lines += [f"- {e}" for e in extra] + ["",
              "## The paper's figures, for orientation", "", PAPER, ""]
    out = here / "RESULTS.md"
    out.write_text("\n".join(lines))
    log(f"wrote {out}")
    return out
