"""The quality report's aggregation over training seeds (synthetic records, no model): mean ± std per
cell, seed counts, tuned rows folded into the default row only when every seed kept the defaults."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from benchmarks.quality.report import Track, e1_groups, e1_summary, pm, section_e1
    from benchmarks.quality.run import split_labels
finally:
    sys.path.remove(str(ROOT))

TASKS = ["a", "b"]


def ref(seed):
    return [dict(exp="ref", track="encoder", seed=seed, method=m, split="test", scores={t: 1.0 for t in TASKS})
            for m in ("zero-shot", "individual")]


def e1(seed, method, k, tuned, chosen, acc, **kw):
    return dict(exp="E1", track="encoder", seed=seed, method=method, k=k, tuned=tuned, chosen=chosen, split="test",
                scores={t: acc for t in TASKS}, merge_s=0.1, **kw)


def test_pm_is_mean_and_sample_std():
    assert pm([0.8]) == "0.800"
    assert pm([0.8, 0.9, 1.0]) == "0.900 ± 0.100"
    assert pm([]) == "-"


def test_tuned_rows_fold_into_default_only_when_every_seed_kept_the_defaults():
    recs = []
    for seed, (chosen, acc) in enumerate([("default", 0.8), ("λ=0.5", 0.9), ("λ=0.5", 0.95)]):
        recs += ref(seed)
        recs.append(e1(seed, "linear", 8, "default", "default", 0.8))
        recs.append(e1(seed, "linear", 8, "val", chosen, acc))
        recs.append(e1(seed, "ties", 8, "default", "default", 0.85 + 0.01 * seed))
        recs.append(e1(seed, "ties", 8, "val", "default", 0.85 + 0.01 * seed))
        recs.append(e1(seed, "ties", 16, "val", "default", 0.87, wider=True))
    T = Track("encoder", recs)
    g = e1_groups(T)
    assert ("ties", "8", "default (also chosen on val)") in g and len(g[("ties", "8", "default (also chosen on val)")]) == 3
    assert not any(m == "ties" and k == "8" and knobs.startswith("val") for m, k, knobs in g)
    tuned = [v for (m, k, knobs), v in g.items() if m == "linear" and knobs.startswith("val")]
    assert len(tuned) == 1 and sorted(r["seed"] for r in tuned[0]) == [0, 1, 2]  # seed 0's default counts as its choice
    assert ("linear", "8", "val (seed 0: default; seed 1: λ=0.5; seed 2: λ=0.5)") in g
    summary = e1_summary(T)
    row = next(line for line in summary.splitlines() if line.startswith("| linear "))
    assert pm([0.8, 0.9, 0.95]) in row and row.rstrip(" |").endswith("3")
    ties = next(line for line in summary.splitlines() if line.startswith("| ties "))
    assert "0.870 ± 0.000" in ties and "- (" not in ties
    assert "| 3 |" in section_e1(T)


def test_row_labels_keep_commas_inside_parentheses():
    assert split_labels("lego (default),lego (norm_rms, previous default), ties") == [
        "lego (default)", "lego (norm_rms, previous default)", "ties"]
