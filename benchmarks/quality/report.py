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
        rows.append([label] + [pm([d[s][t] for s in d]) for t in T.tasks] + [pm([mean(d[s].values()) for s in d])])
    return table(["", *map(short, T.tasks), "mean"], rows)


def section_e0(T: Track) -> str:
    recs = T.exp("E0")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: r["method"])
    rows = []
    for m, rs in g.items():
        per_seed = grouped(rs, lambda r: r["seed"])
        per_task = {t: [r["scores"][t] for r in rs if r["task"] == t] for t in T.tasks}
        rows.append([m] + [pm(per_task[t]) for t in T.tasks] + [pm([mean(r["scores"][r["task"]] for r in v) for v in per_seed.values()])])
    return table(["method (LoRA + rank-permuted copy)", *map(short, T.tasks), "mean"], rows)


def section_e1(T: Track) -> str:
    recs = T.exp("E1")
    if not recs:
        return "not run"
    ind = T.ref("individual")
    dup = lambda r: r["tuned"] == "val" and r.get("chosen") == "default" and not r.get("wider")  # noqa: E731
    kept = {(r["method"], str(r["k"])) for r in recs if dup(r)}
    recs = [r for r in recs if not dup(r)]
    g = grouped(recs, lambda r: (r["method"], str(r["k"]), r["tuned"]))
    rows = []
    for (m, k, tuned), rs in sorted(g.items(), key=lambda kv: (kv[0][1].isdigit() and int(kv[0][1]) or 0, -mean(mean(r["scores"].values()) for r in kv[1]))):
        means = [mean(r["scores"].values()) for r in rs]
        norm = [mean(r["scores"][t] / ind[r["seed"]][t] for t in T.tasks) for r in rs]
        chosen = ", ".join(sorted({r.get("chosen", "") for r in rs})) if tuned == "val" else ""
        secs = [r["merge_s"] for r in rs if r.get("merge_s") is not None]
        if tuned == "default" and (m, k) in kept:
            tuned = "default (also chosen on val)"
        rows.append([m, k, tuned + (f" ({chosen})" if chosen else "")]
                    + [pm([r["scores"][t] for r in rs]) for t in T.tasks]
                    + [f"**{pm(means)}**", pm(norm), f"{mean(secs):.2f}" if secs else "-"])
    return table(["method", "rank k", "knobs", *map(short, T.tasks), "mean", "mean / individual", "merge s"], rows)


def section_e2(T: Track) -> str:
    recs = T.exp("E2")
    if not recs:
        return "not run"
    info = [r for r in recs if r["method"] == "retrieval recall"]
    g = grouped([r for r in recs if "scores" in r], lambda r: r["method"])
    rows = []
    for label, method in (("zero-shot", "zero-shot"), ("individual (oracle: the input's own LoRA)", "individual")):
        d = T.ref(method)
        rows.append([label] + [pm([d[s][t] for s in d]) for t in T.tasks] + [pm([mean(d[s].values()) for s in d]), "-"])
    for m, rs in g.items():
        rows.append([m + " of the top 3"] + [pm([r["scores"][t] for r in rs]) for t in T.tasks]
                    + [f"**{pm([mean(r['scores'].values()) for r in rs])}**", f"{mean(r['merge_s'] for r in rs):.2f}"])
    head = ""
    if info:
        head = (f"Retrieval recall (the input's own task among the 3 retrieved): {pm([r['recall'] for r in info])}; "
                f"distinct sets of 3 merged: {', '.join(str(r['groups']) for r in info)}. Methods at their default knobs.\n\n")
    return head + table(["method", *map(short, T.tasks), "mean", "merge s per set"], rows)


def section_e3(T: Track) -> str:
    recs = T.exp("E3")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: r["method"])
    rows = []
    for m, rs in g.items():
        rows.append([m] + [pm([r["scores"][t] for r in rs if r["task"] == t]) for t in T.tasks]
                    + [pm([mean(r["scores"][r["task"]] for r in v) for v in grouped(rs, lambda r: r["seed"]).values()])])
    return table(["merge of the other tasks → held-out task", *map(short, T.tasks), "mean"], rows)


def section_e4(T: Track) -> str:
    recs = T.exp("E4")
    if not recs:
        return "not run"
    ind = [r for r in recs if r["method"] == "individual"]
    merged = [r for r in recs if r["method"] != "individual"]
    tasks = list(merged[0]["scores"]) if merged else []
    rows = []
    if ind:
        rows.append(["individual LoRAs of those ranks", "-"] + [pm([r["scores"][t] for r in ind if r["task"] == t]) for t in tasks]
                    + [pm([mean(r["scores"][r["task"]] for r in ind)])])
    for (m, kind), rs in grouped(merged, lambda r: (r["method"], r["inputs"])).items():
        rows.append([m, kind] + [pm([r["scores"][t] for r in rs]) for t in tasks] + [f"**{pm([mean(r['scores'].values()) for r in rs])}**"])
    return ("Merged at k = 8; ranks per task: " + ", ".join(f"{short(t)} r={r}" for t, r in
            zip(tasks, [int(x) for x in merged[0]["inputs"].split()[1].split("/")])) + ".\n\n"
            + table(["method", "inputs", *map(short, tasks), "mean"], rows)) if merged else "not run"


def section_e5(T: Track) -> str:
    recs = T.exp("E5")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: (r["method"], r["k"]))
    rows = []
    for (m, k), rs in sorted(g.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        per_seed = grouped(rs, lambda r: r["seed"])
        rows.append([m, str(k)] + [pm([r["retention"] for r in rs if r["task"] == t]) for t in T.tasks]
                    + [f"**{pm([mean(r['retention'] for r in v) for v in per_seed.values()])}**"])
    return table(["pruning method", "rank k", *map(short, T.tasks), "mean retention"], rows)


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
        parts.append("Scale probe (run after the default was chosen; validation): the default LoRA-LEGO with every "
                     "input weighted λ > 1, i.e. the merged update scaled to λ times the RMS of the inputs' norms "
                     "(λ = 1 is the default, in the tables above):\n\n"
                     + table(["task set", *(f"λ={lam}" for lam in lams)], rows))
    gain = T.exp("E6g")
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
                     "rms·sqrt(N) for orthogonal ones), `norm_geo` to sqrt(rms · gain). The first 5 sets are stage 2's; "
                     "the others are the 4- and 2-task sets drawn with subset seeds 1 and 2:\n\n"
                     + table(["task set", *rules], rows))
    return "\n\n".join(parts)


def subsets_of_seed0(T: Track) -> list[list[str]]:
    from .experiments import subsets
    return subsets(T.tasks, 0)


def section_e7(T: Track, out: Path) -> str:
    recs = T.exp("E7")
    if not recs:
        return "not run"
    g = grouped(recs, lambda r: (r["method"], r["k"]))
    rows = [[m, str(k), pm([mean(r["scores"].values()) for r in rs]), f"{mean(r['merge_s'] for r in rs):.2f}"]
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
    return table(["method", "k", "test mean", "merge s"], rows) + plot


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
            head = [TRACK_INFO[T.name].rstrip(";") + sizes + ".", "",
                    f"Seeds run: {', '.join(map(str, T.seeds))}. Command: `{cmd}` (E6 first: it chose the "
                    "LoRA-LEGO default that the later experiments use as `lego (default)`; the results in this file "
                    "came from runs of that command split into `--experiments E6`, then `E1,E0,E5,E3,E7`, then "
                    "`E2,E6s`, then `E1x,E4`, then `E6g,E1v` (E6g: the output-scale rules on more task sets; E1v: E1's "
                    "`lego (norm_geo)` rows), each adding its records to the results file). Test and validation sizes "
                    "are the command's defaults (`--n-test 200 --n-val 100`). The rows `lego (default)` were measured "
                    "with `output_reweight=norm_rms`, E6's choice and the default when they ran; E6g's comparison then "
                    "made `norm_geo` the default, which the rows `lego (norm_geo)` measure.", ""]
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
                  plot_e1(T, here) + section_e1(T), ""]),
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
        if len(T.seeds) < 3:
            extra.append(f"{T.name} track: training seeds {', '.join(str(s) for s in range(len(T.seeds), 3))} "
                         "(the tables have no spread over seeds)")
        wider = {r["method"] for r in T.exp("E1") if r.get("wider")}
        if wider:
            extra.append(f"{T.name} E1 at 2r and 4r for methods other than {', '.join(sorted(wider))}")
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
