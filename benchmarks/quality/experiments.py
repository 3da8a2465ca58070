"""The experiments E0..E7 over one track and one training seed. Each returns records (dicts) that the
report turns into tables; every knob that is tuned is tuned on the validation split, never on test."""

from __future__ import annotations

import itertools
import random
import time

import torch

from lora_lego import METHODS, Adapter, Factors, load_adapter

from .common import Candidate, deltas_of, density_grid, ensemble_scores, lambda_grid, mean, run_merge, score

# The lego configuration the paper describes (and this project shipped first), kept as a named row.
PAPER_LEGO = dict(param_reweight="joint", output_reweight="sqrt", canonicalize="none", unit_split="b")


class Context:
    """One track, one seed: the task adapters, their dense updates, and the reference scores."""

    def __init__(self, track, seed: int, rank: int, steps: int, log=print, known: list[dict] = ()):
        """``known``: reference records of an earlier run, reused when they cover the same tasks and
        split sizes (the adapters come from the same cache)."""
        self.track, self.seed, self.rank, self.log = track, seed, rank, log
        self.tasks = list(track.tasks)
        self.paths = {t: track.train(t, seed, rank=rank, steps=steps, log=log) for t in self.tasks}
        self.adapters = {t: load_adapter(p) for t, p in self.paths.items()}
        self.deltas = {t: deltas_of(a) for t, a in self.adapters.items()}
        sizes = self.sizes()
        old = {(r["method"], r["split"]): r["scores"] for r in known
               if r["exp"] == "ref" and r["seed"] == seed and r.get("sizes") == sizes}
        if len(old) == 4:
            self.zero = {s: old[("zero-shot", s)] for s in ("val", "test")}
            self.individual = {s: old[("individual", s)] for s in ("val", "test")}
            return
        self.zero = {s: score(track, None, self.tasks, s) for s in ("val", "test")}
        self.individual = {s: {t: score(track, self.deltas[t], [t], s)[t] for t in self.tasks} for s in ("val", "test")}

    def sizes(self) -> dict:
        return {t: {s: len(getattr(self.track.tasks[t], s)) for s in ("val", "test")} for t in self.tasks}

    def base_record(self, exp: str, **kw) -> dict:
        return dict(exp=exp, track=self.track.name, seed=self.seed, **kw)


def reference_records(ctx: Context) -> list[dict]:
    return [ctx.base_record("ref", method=m, split=s, scores=d[s], sizes=ctx.sizes())
            for m, d in (("zero-shot", ctx.zero), ("individual", ctx.individual)) for s in ("val", "test")]


# -- E0 ---------------------------------------------------------------------------------------------
def permuted_copy(adapter: Adapter, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in adapter.modules:
        f = adapter.factors(n)
        p = torch.randperm(f.rank, generator=g)
        out[n] = Factors(f.A[p].clone(), f.B[:, p].clone())
    return Adapter.from_factors(out, config=dict(adapter.config))


def factor_average(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Naive averaging of the factors themselves (mean A times mean B): what collapses under permutation."""
    out = {}
    for n in adapters[0].modules:
        fs = [a.factors(n) for a in adapters]
        out[n] = (sum(f.B for f in fs) / len(fs)) @ (sum(f.A for f in fs) / len(fs))
    return out


def e0_permutation(ctx: Context, lego_default: dict) -> list[dict]:
    recs = []
    for t in ctx.tasks:
        a = ctx.adapters[t]
        pair = [a, permuted_copy(a, 1000 + ctx.seed)]
        rows = {"individual": ctx.individual["test"][t],
                "factor average (A and B averaged)": score(ctx.track, factor_average(pair), [t], "test")[t],
                "ensemble (outputs)": ensemble_scores(ctx.track, [ctx.deltas[t], deltas_of(pair[1])], [t], "test")[t],
                "lego (paper config)": score(ctx.track, run_merge(pair, "lego", ctx.rank, None, ctx.seed, **PAPER_LEGO).deltas, [t], "test")[t],
                "lego (default)": score(ctx.track, run_merge(pair, "lego", ctx.rank, None, ctx.seed, **lego_default).deltas, [t], "test")[t]}
        if "average" in METHODS:
            rows["average (method)"] = score(ctx.track, run_merge(pair, "average", ctx.rank, None, ctx.seed).deltas, [t], "test")[t]
        for m, acc in rows.items():
            recs.append(ctx.base_record("E0", method=m, task=t, split="test", scores={t: acc}))
    return recs


# -- E6 ---------------------------------------------------------------------------------------------
def e6_grid() -> list[dict]:
    """At k = r the paper's output reweightings sqrt(r/k), r/k and 1 are all 1, so its 3 x 3 x 3 grid has
    9 distinct members (output_reweight=sqrt stands for all three). Then the variants beyond the paper:
    the merged update scaled to a norm computed from the inputs, and clustering directions with the
    centroids given the mean or the summed magnitude of their members."""
    paper = [dict(param_reweight=p, output_reweight="sqrt", canonicalize=c)
             for p, c in itertools.product(("joint", "halves", "none"), ("none", "sign", "balance"))]
    new = [dict(param_reweight="joint", output_reweight=o, canonicalize=c)
           for o, c in itertools.product(("norm_mean", "norm_rms", "norm_sum"), ("none", "balance", "direction"))]
    direction = [dict(param_reweight=p, output_reweight="sqrt", canonicalize="direction") for p in ("joint", "sum")]
    return paper + new + direction


def subsets(tasks: list[str], seed: int) -> list[list[str]]:
    """All tasks, plus two random 4-task and two random 2-task subsets: a default must hold for any N."""
    rng = random.Random(f"subsets:{seed}")
    sizes = [s for s in (len(tasks) // 2, 2) if 2 <= s < len(tasks)]
    return [list(tasks)] + [sorted(rng.sample(tasks, s)) for s in sizes for _ in range(2)]


def config_label(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())


def e6_ablation(ctx: Context, top: int = 4, sink=lambda recs: None) -> tuple[list[dict], dict]:
    """Stage 1: every configuration on all tasks (validation). Stage 2: the best ``top`` and the paper's
    config on task subsets of 2 and 4 (validation). Stage 3: k-means restarts and seeds for the winner.
    Returns the records and the winning configuration (best mean over stage 2's sets)."""
    recs = []
    stage1 = []
    for c in e6_grid():
        m = run_merge(list(ctx.adapters.values()), "lego", ctx.rank, None, ctx.seed, **c)
        s = score(ctx.track, m.deltas, ctx.tasks, "val")
        stage1.append((mean(s), c))
        recs.append(ctx.base_record("E6", stage=1, config=c, label=config_label(c), split="val", scores=s, merge_s=m.seconds))
        sink(recs[-1:])
        ctx.log(f"  E6 {config_label(c)}: {mean(s):.4f} (merge {m.seconds:.1f}s)")
    stage1.sort(key=lambda x: -x[0])
    finalists = [c for _, c in stage1[:top]]
    if dict(PAPER_LEGO, unit_split="b") not in [dict(c, unit_split="b") for c in finalists]:
        finalists.append({k: v for k, v in PAPER_LEGO.items() if k != "unit_split"})
    sets = subsets(ctx.tasks, ctx.seed)
    stage1_mean = {config_label(c): v for v, c in stage1}
    best = None
    for c in finalists:
        per_set = [stage1_mean[config_label(c)]]  # the all-task set was measured in stage 1
        for ts in sets[1:]:
            m = run_merge([ctx.adapters[t] for t in ts], "lego", ctx.rank, None, ctx.seed, **c)
            s = score(ctx.track, m.deltas, ts, "val")
            per_set.append(mean(s))
            recs.append(ctx.base_record("E6", stage=2, config=c, label=config_label(c), tasks=ts, split="val", scores=s))
            sink(recs[-1:])
        avg = sum(per_set) / len(per_set)
        ctx.log(f"  E6 subsets {config_label(c)}: {avg:.4f} {['%.3f' % x for x in per_set]}")
        if best is None or avg > best[0]:
            best = (avg, c)
    winner = best[1]
    for n_init, kseed in itertools.product((1, 10), (1, 2)):
        m = run_merge(list(ctx.adapters.values()), "lego", ctx.rank, None, 100 * ctx.seed + kseed, n_init=n_init, **winner)
        s = score(ctx.track, m.deltas, ctx.tasks, "val")
        recs.append(ctx.base_record("E6", stage=3, config=dict(winner, n_init=n_init), kmeans_seed=kseed, split="val",
                                    scores=s, merge_s=m.seconds))
        sink(recs[-1:])
    return recs, winner


# -- E1 / E7 ----------------------------------------------------------------------------------------
def tune(ctx: Context, method: str, adapters: list[Adapter], tasks: list[str], rank: int | None, fixed: dict) -> tuple[Candidate, list[dict]]:
    """λ from the shared grid (and the method's default), then the density at that λ, on validation."""
    recs, best = [], None

    def trial(cands):
        nonlocal best
        for cand in cands:
            m = run_merge(adapters, method, rank, cand.weights, ctx.seed, **fixed, **cand.opts)
            s = score(ctx.track, m.deltas, tasks, "val")
            recs.append(ctx.base_record("tune", method=method, label=cand.label, fixed=fixed, split="val", scores=s))
            if best is None or mean(s) > best[0]:
                best = (mean(s), cand)

    trial(lambda_grid(len(adapters)))
    trial(density_grid(method, best[1]))
    return best[1], recs


# E1 rows for lego variants beside the default (E1 runs them; run.py's E1v re-runs only them): the previous
# default output rule, so that every seed compares it with today's norm_geo on test
LEGO_VARIANTS = {"lego (norm_rms, previous default)": dict(output_reweight="norm_rms")}


def e1_methods(lego_default: dict, variants: tuple[str, ...] = ()) -> list[tuple[str, str, dict]]:
    """(row label, registered method, fixed options) for E1; ``variants``: LEGO_VARIANTS rows to add."""
    rows = [("lego (default)", "lego", lego_default), ("lego (paper config)", "lego", dict(PAPER_LEGO))]
    rows += [(v, "lego", dict(lego_default, **LEGO_VARIANTS[v])) for v in variants]
    for name in METHODS:
        if name not in ("lego", "concat"):
            rows.append((name, name, {}))
    return rows


def ranked_rows(lego_default: dict) -> tuple[str, ...]:
    """E1's row labels whose method takes a rank budget (the rows E1x repeats at 2r and 4r)."""
    return tuple(label for label, method, _ in e1_methods(lego_default, tuple(LEGO_VARIANTS)) if METHODS[method].takes_rank)


def e1_multitask(ctx: Context, lego_default: dict, multiples=(1,), sink=lambda recs: None, skip=(),
                 variants: tuple[str, ...] = (), tune_knobs: bool = True,
                 only: list[str] | None = None, reuse: dict | None = None) -> list[dict]:
    """Every method at k = r (defaults, and knobs tuned on validation); at 2r and 4r with the tuned knobs.
    ``skip``: row labels already measured (a resumed run). ``tune_knobs=False``: defaults only, no
    validation grid (a quick run). ``only``: the row labels to run (None: all, with the output ensemble).
    ``reuse``: {(row label, k or None for exact methods): record} of test rows at default knobs that an
    earlier run measured; they are not measured again (the earlier records stay where they are)."""
    reuse = reuse or {}
    recs = []
    adapters = [ctx.adapters[t] for t in ctx.tasks]
    if "ensemble (outputs)" not in skip and (only is None or "ensemble (outputs)" in only):
        s = ensemble_scores(ctx.track, [ctx.deltas[t] for t in ctx.tasks], ctx.tasks, "test")
        recs.append(ctx.base_record("E1", method="ensemble (outputs)", k="N models", tuned="none", split="test", scores=s))
        sink(recs[-1:])
    for label, method, fixed in [("concat", "concat", {})] + e1_methods(lego_default, variants):
        if label in skip or (only is not None and label not in only):
            continue
        t0 = time.perf_counter()
        takes_rank = METHODS[method].takes_rank
        new = []
        if not tune_knobs:
            chosen = Candidate("default", None)
        elif method in ("concat", "ensemble"):  # exact: only the output scale could be tuned, and concat has it
            chosen = Candidate("default", None)
            if method == "concat":
                chosen, trecs = tune(ctx, method, adapters, ctx.tasks, None, fixed)
                new += [dict(r, row=label) for r in trecs]
        else:
            chosen, trecs = tune(ctx, method, adapters, ctx.tasks, ctx.rank if takes_rank else None, fixed)
            new += [dict(r, row=label) for r in trecs]
        at_r = None  # the test row at k = r (or the exact one) that the log line shows
        for mult in (multiples if takes_rank else (None,)):
            k = ctx.rank * mult if mult else None
            variants = [("default", Candidate("default", None))] if mult in (1, None) else []
            if chosen.label != "default" or not variants:
                variants.append(("val", chosen))
            for tuned, cand in variants:
                old = reuse.get((label, k)) if tuned == "default" else None
                if old is not None:  # measured by an earlier run at the same knobs (the merge is seeded)
                    rec = old
                else:
                    m = run_merge(adapters, method, k, cand.weights, ctx.seed, **fixed, **cand.opts)
                    s = score(ctx.track, m.deltas, ctx.tasks, "test")
                    rec = ctx.base_record("E1", method=label, k=k if k else f"{m.rank} (exact)", tuned=tuned,
                                          chosen=cand.label, split="test", scores=s, merge_s=m.seconds)
                    new.append(rec)
                if tuned == "default" and chosen.label == "default" and tune_knobs:
                    rec = dict(rec, tuned="val")
                    new.append(rec)
                if k in (ctx.rank, None):
                    at_r = rec
        recs += new
        sink(new)
        ctx.log(f"  E1 {label}: chose {chosen.label} on validation; test mean at k=r "
                f"{mean(at_r['scores']) if at_r else float('nan'):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return recs


def e7_rank_sweep(ctx: Context, lego_default: dict, linear_choice: dict | None = None) -> list[dict]:
    recs = []
    adapters = [ctx.adapters[t] for t in ctx.tasks]
    n = len(adapters)
    ks = [ctx.rank // 2, ctx.rank, 2 * ctx.rank, 4 * ctx.rank, n * ctx.rank]
    rows = [("lego (default)", "lego", None, lego_default)]
    if "linear" in METHODS:
        rows.append(("linear (λ tuned in E1)" if linear_choice else "linear", "linear",
                     (linear_choice or {}).get("weights"), (linear_choice or {}).get("opts", {})))
    for label, method, weights, opts in rows:
        for k in ks:
            m = run_merge(adapters, method, k, weights, ctx.seed, **opts)
            s = score(ctx.track, m.deltas, ctx.tasks, "test")
            recs.append(ctx.base_record("E7", method=label, k=k, split="test", scores=s, merge_s=m.seconds))
    return recs


# -- E3 ---------------------------------------------------------------------------------------------
def e3_out_of_domain(ctx: Context, lego_default: dict) -> list[dict]:
    recs = []
    rows = [("lego (default)", "lego", None, lego_default), ("lego (paper config)", "lego", None, dict(PAPER_LEGO))]
    for name in ("linear", "ties", "task_arithmetic"):
        if name in METHODS:
            rows.append((name, name, None, {}))
    for held in ctx.tasks:
        others = [ctx.adapters[t] for t in ctx.tasks if t != held]
        recs.append(ctx.base_record("E3", method="zero-shot", task=held, split="test", scores={held: ctx.zero["test"][held]}))
        for label, method, w, opts in rows:
            m = run_merge(others, method, ctx.rank if METHODS[method].takes_rank else None, w, ctx.seed, **opts)
            recs.append(ctx.base_record("E3", method=label, task=held, split="test",
                                        scores=score(ctx.track, m.deltas, [held], "test")))
    return recs


# -- E5 ---------------------------------------------------------------------------------------------
def svd_truncate(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).float()


def drop_units(f: Factors, k: int) -> torch.Tensor:
    """Keep the k units with the largest rank-1 norm |b_i| |a_i|, drop the rest."""
    keep = (f.B.norm(dim=0) * f.A.norm(dim=1)).argsort(descending=True)[:k]
    return f.B[:, keep] @ f.A[keep]


def e5_pruning(ctx: Context, lego_default: dict) -> list[dict]:
    from lora_lego import prune

    recs = []
    for t in ctx.tasks:
        a = ctx.adapters[t]
        for k in (ctx.rank // 2, ctx.rank // 4):
            rows = {
                "lego clustering (default)": deltas_of(prune(a, k, seed=ctx.seed, **lego_default)),
                "lego clustering (paper config)": deltas_of(prune(a, k, seed=ctx.seed, **PAPER_LEGO)),
                "SVD truncation": {n: svd_truncate(d, k) for n, d in ctx.deltas[t].items()},
                "drop smallest units": {n: drop_units(a.factors(n), k) for n in a.modules},
            }
            for m, d in rows.items():
                acc = score(ctx.track, d, [t], "test")[t]
                recs.append(ctx.base_record("E5", method=m, task=t, k=k, split="test", scores={t: acc},
                                            retention=acc / ctx.individual["test"][t]))
    return recs


# -- E2 ---------------------------------------------------------------------------------------------
def e2_mixed_task(ctx: Context, lego_default: dict, top: int = 3, n_keys: int = 100) -> list[dict]:
    """Inputs of every task arrive together. Each test input retrieves the ``top`` task LoRAs whose key
    (the mean base-model embedding of ``n_keys`` training items) is closest to its own base embedding;
    those LoRAs are merged and the input is scored with its task's head. Methods at their defaults."""
    track = ctx.track
    track.set_deltas(None)
    keys = torch.stack([torch.nn.functional.normalize(track.embed_items(t, "train", list(range(n_keys))).mean(0), dim=0)
                        for t in ctx.tasks])
    groups: dict[tuple, dict[str, list[int]]] = {}
    hits = total = 0
    for t in ctx.tasks:
        n = len(getattr(track.tasks[t], "test"))
        emb = track.embed_items(t, "test", list(range(n)))
        chosen = (emb @ keys.T).topk(top, dim=1).indices.tolist()
        for i, c in enumerate(chosen):
            names = tuple(sorted(ctx.tasks[j] for j in c))
            groups.setdefault(names, {}).setdefault(t, []).append(i)
            hits += t in names
            total += 1
    recs = [ctx.base_record("E2", method="retrieval recall", split="test", recall=hits / total, groups=len(groups))]
    rows = [("lego (default)", "lego", lego_default), ("lego (paper config)", "lego", dict(PAPER_LEGO))]
    rows += [(m, m, {}) for m in ("linear", "ties", "task_arithmetic", "ensemble") if m in METHODS]
    for label, method, opts in rows:
        correct = {t: 0 for t in ctx.tasks}
        seconds = 0.0
        for names, per_task in groups.items():
            m = run_merge([ctx.adapters[t] for t in names], method, ctx.rank if METHODS[method].takes_rank else None,
                          None, ctx.seed, **opts)
            seconds += m.seconds
            track.set_deltas(m.deltas)
            for t, idx in per_task.items():
                pred = track.logits_items(t, "test", idx).argmax(1)
                correct[t] += int((pred == track.labels(t, "test")[idx]).sum())
        s = {t: correct[t] / len(getattr(track.tasks[t], "test")) for t in ctx.tasks}
        recs.append(ctx.base_record("E2", method=label, split="test", scores=s, merge_s=seconds / len(groups)))
        ctx.log(f"  E2 {label}: {mean(s):.3f}")
    return recs


# -- E6, scale probe ----------------------------------------------------------------------------------
def e6_scale_probe(ctx: Context, lego_default: dict, lambdas=(1.5, 2.0, 3.0)) -> list[dict]:
    """Validation only: the default LoRA-LEGO with every input weighted λ > 1 (beyond the shared tuning
    grid), on all tasks and on the 2-task subsets: is the remaining gap one of overall scale?"""
    recs = []
    for ts in [s for s in subsets(ctx.tasks, ctx.seed) if len(s) in (len(ctx.tasks), 2)]:
        for lam in lambdas:
            m = run_merge([ctx.adapters[t] for t in ts], "lego", ctx.rank, [lam] * len(ts), ctx.seed, **lego_default)
            s = score(ctx.track, m.deltas, ts, "val")
            recs.append(ctx.base_record("E6s", lam=lam, tasks=ts, split="val", scores=s))
            ctx.log(f"  E6 scale probe λ={lam} {','.join(ts)}: {mean(s):.4f}")
    return recs


# -- E6, output-scale rules ----------------------------------------------------------------------------
GAIN_RULES = ("norm_rms", "norm_gain", "norm_geo")


def e6_gain(ctx: Context, lego_default: dict, rules=GAIN_RULES, subset_seeds=(0, 1, 2)) -> list[dict]:
    """Validation only, on stage 2's task sets (all tasks, two of 4, two of 2) and on the 4- and 2-task
    sets drawn with further subset seeds: the data-free output-scale rules against each other,
    everything else at the current default (run after the scale probe)."""
    recs = []
    sets = []
    for sub in subset_seeds:
        sets += [ts for ts in subsets(ctx.tasks, ctx.seed + sub) if ts not in sets]
    for ts in sets:
        for rule in rules:
            c = dict(lego_default, output_reweight=rule)
            m = run_merge([ctx.adapters[t] for t in ts], "lego", ctx.rank, None, ctx.seed, **c)
            s = score(ctx.track, m.deltas, ts, "val")
            recs.append(ctx.base_record("E6g", config=c, rule=rule, tasks=ts, split="val", scores=s, merge_s=m.seconds))
            ctx.log(f"  E6g {rule} {','.join(ts)}: {mean(s):.4f}")
    return recs


# -- E4 ---------------------------------------------------------------------------------------------
E4_RANKS = {"sms_spam": 4, "movie_sent": 4, "trec": 16, "tweet_sent": 16}


def e4_heterogeneous(ctx: Context, lego_default: dict, steps: int, linear_lambda: float | None = None) -> list[dict]:
    """Task LoRAs of ranks 4 and 16 (E4_RANKS) merged at k = 8, beside the same tasks' rank-8 LoRAs
    merged the same way. Methods at their defaults; linear also at the λ chosen in E1."""
    tasks = [t for t in E4_RANKS if t in ctx.tasks]
    hetero = [load_adapter(ctx.track.train(t, ctx.seed, rank=E4_RANKS[t], steps=steps, log=ctx.log)) for t in tasks]
    homo = [ctx.adapters[t] for t in tasks]
    rows = [("lego (default)", "lego", None, lego_default), ("lego (paper config)", "lego", None, dict(PAPER_LEGO)),
            ("linear", "linear", None, {}), ("ties", "ties", None, {}), ("task_arithmetic", "task_arithmetic", None, {})]
    if linear_lambda:
        rows.append((f"linear (λ={linear_lambda}, E1's choice)", "linear", [linear_lambda] * len(tasks), {}))
    recs = []
    for label, method, w, opts in rows:
        if method not in METHODS:
            continue
        for kind, adapters in (("ranks " + "/".join(str(E4_RANKS[t]) for t in tasks), hetero), ("all rank 8", homo)):
            m = run_merge(adapters, method, ctx.rank, w, ctx.seed, **opts)
            s = score(ctx.track, m.deltas, tasks, "test")
            recs.append(ctx.base_record("E4", method=label, inputs=kind, k=ctx.rank, split="test", scores=s, merge_s=m.seconds))
            ctx.log(f"  E4 {label} {kind}: {mean(s):.3f}")
    for t, a in zip(tasks, hetero):
        recs.append(ctx.base_record("E4", method="individual", inputs=f"rank {E4_RANKS[t]}", task=t, split="test",
                                    scores={t: score(ctx.track, deltas_of(a), [t], "test")[t]}))
    return recs


# -- E1 at 2r and 4r --------------------------------------------------------------------------------
def parse_choice(label: str, n: int) -> tuple[list[float] | None, dict]:
    """A tuning label ("default", "λ=0.5", "λ=0.5, density=0.8", "default, density=0.5") back to knobs."""
    weights, opts = None, {}
    for part in (p.strip() for p in label.split(",")):
        if part.startswith("λ="):
            weights = [float(part[2:])] * n
        elif "=" in part:
            key, value = part.split("=")
            opts[key] = float(value)
    return weights, opts


def e1_wider(ctx: Context, lego_default: dict, records: list[dict], multiples=(2, 4),
             rows=("lego (default)", "ties", "linear", "task_arithmetic")) -> list[dict]:
    """E1's rows again at k = 2r and 4r, each with the knobs E1 chose on validation at k = r."""
    adapters = [ctx.adapters[t] for t in ctx.tasks]
    fixed = {label: opts for label, _, opts in e1_methods(lego_default, tuple(LEGO_VARIANTS))}
    methods = {label: method for label, method, _ in e1_methods(lego_default, tuple(LEGO_VARIANTS))}
    recs = []
    for label in rows:
        chosen = [r for r in records if r["exp"] == "E1" and r["seed"] == ctx.seed and r["method"] == label
                  and r["tuned"] == "val" and r["k"] == ctx.rank]
        if not chosen or label not in methods:
            continue
        weights, opts = parse_choice(chosen[0]["chosen"], len(adapters))
        for mult in multiples:
            k = ctx.rank * mult
            m = run_merge(adapters, methods[label], k, weights, ctx.seed, **fixed[label], **opts)
            s = score(ctx.track, m.deltas, ctx.tasks, "test")
            recs.append(ctx.base_record("E1", method=label, k=k, tuned="val", chosen=chosen[0]["chosen"], split="test",
                                        scores=s, merge_s=m.seconds, wider=True))
            ctx.log(f"  E1 {label} k={k}: {mean(s):.3f}")
    return recs
