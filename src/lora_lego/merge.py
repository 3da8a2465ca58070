"""The merge driver: loop over modules, gather each module's factors from the inputs that have it, run
the method, collect the result. Memory stays bounded by one module's factors across the inputs."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .adapter import Adapter, Factors, ModuleSpec, widest_dtype
from .errors import LoraLegoError
from .formats.names import check_qkv_layouts
from .formats.tensors import largest_magnitude
from .kmeans_core import MAX_ABS
from .methods import MergeMethod, ModuleJob, get_method
from .prefetch import GramPrefetch
from .torch_random import module_seed  # noqa: F401 (part of merge's interface)

ProgressFn = Callable[[int, int, str], None]

# A batch of modules merged in one fn_many call: lego's k-means costs ~2x less per module in batches of 4
# or more (its per-call cost is mostly fixed); the byte bound keeps memory low where modules are large
# (their clustering is no longer cheap, so batching them gains nothing).
BATCH_MODULES = 8
BATCH_BYTES = 32 * 2**20


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraLegoError("--device cuda was asked for but no CUDA device is available (use cpu or auto)")
    return dev


def default_weights(method: MergeMethod, n: int) -> list[float]:
    return [1.0 / n] * n if method.default_weight == "mean" else [1.0] * n


def check_options(method: MergeMethod, options: dict[str, Any]) -> dict[str, Any]:
    known = {o.name: o for o in method.options}
    resolved = method.option_defaults()
    for key, value in options.items():
        if key not in known:
            flag = "--" + key.replace("_", "-")
            raise LoraLegoError(f"option {flag} does not apply to method {method.name}"
                                + (f" (its options: {', '.join('--' + o.replace('_', '-') for o in known)})" if known else ""))
        opt = known[key]
        if opt.choices is not None and value not in opt.choices:
            raise LoraLegoError(f"--{key.replace('_', '-')} must be one of {', '.join(map(str, opt.choices))}, got {value!r}")
        if opt.valid is not None and not opt.valid(value):
            raise LoraLegoError(f"--{key.replace('_', '-')} must be {opt.valid_text}, got {value!r}")
        resolved[key] = value
    return resolved


def _module_shape(adapter: Adapter, spec: ModuleSpec) -> tuple:
    return (spec.kind, spec.d_out, spec.d_in, spec.a_shape[2:])


def merge(
    adapters: Sequence[Adapter],
    method: str = "lego",
    rank: int | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    gram_prefetch: GramPrefetch | None = None,
    **options: Any,
) -> Adapter:
    """Merge ``adapters`` module by module with ``method`` into one adapter held in memory.

    ``rank``: output rank per module (default: the largest input rank of that module); refused by exact
    methods. ``weights``: one number per adapter (default: the method's, 1 each or 1/N). ``seed`` fixes
    every random choice: the same inputs and seed give bit-identical output on the same device.
    Method options (e.g. ``param_reweight="halves"``) are passed as keywords. ``gram_prefetch``: the CLI's
    ``prefetch.ACTIVE``, lego's merged factors (or Gram products) computed ahead for these inputs and
    settings (used where they match, bit for bit what the merge computes itself; closed when the merge
    ends)."""
    try:
        return _merge(adapters, method, rank, weights, seed, device, progress, gram_prefetch, options)
    finally:
        if gram_prefetch is not None:
            gram_prefetch.close()


def _merge(adapters: Sequence[Adapter], method: str, rank: int | None, weights: Sequence[float] | None, seed: int,
           device: str | torch.device, progress: ProgressFn | None, gram_prefetch: GramPrefetch | None,
           options: dict[str, Any]) -> Adapter:
    adapters = list(adapters)
    if not adapters:
        raise LoraLegoError("no input adapters")
    m = get_method(method)
    opts = check_options(m, options)
    if rank is not None:
        if not m.takes_rank:
            raise LoraLegoError(f"--rank does not apply to {m.name}: it is exact at the summed rank; "
                                "use a truncating method (lego, or linear and the other baselines) to choose a rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoraLegoError(f"--rank must be a whole number >= 1, got {rank!r}")
    if weights is None:
        weights = default_weights(m, len(adapters))
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise LoraLegoError(f"--weights has {len(weights)} value(s) for {len(adapters)} input adapter(s)")
    if not all(torch.isfinite(torch.tensor(weights))):
        raise LoraLegoError("--weights must be finite numbers")
    dev = resolve_device(device)
    _check_compatible_configs(adapters)
    check_qkv_layouts(adapters)
    if gram_prefetch is not None and not (m.prepare_takes_grams and dev.type == "cpu"
                                          and all(a.format == "peft" and a.path is not None for a in adapters)
                                          and gram_prefetch.matches([str(a.path) for a in adapters])):
        gram_prefetch.close()  # computed for something else: stop the workers, use nothing of theirs
        gram_prefetch = None
    if gram_prefetch is not None and not gram_prefetch.accept(rank, weights, seed, opts, m.name) \
            and gram_prefetch.settings is not None:
        gram_prefetch.close()  # merged with other settings than the merge's (its Grams are not kept): of no use
        gram_prefetch = None

    names: list[str] = []
    seen = set()
    for a in adapters:
        for name in a.modules:
            if name not in seen:
                seen.add(name)
                names.append(name)

    out: dict[str, Factors] = {}
    templates: dict[str, ModuleSpec] = {}
    partial: dict[str, list[int]] = {}
    dtypes = set()

    # the indices of the inputs that have each module (read by both threads)
    holders_of = {name: [i for i, a in enumerate(adapters) if name in a.modules] for name in names}

    def check_module(name: str) -> list[int]:
        """Refuse a module the inputs disagree on; the indices of the inputs that have it."""
        holders = holders_of[name]
        specs = [adapters[i].modules[name] for i in holders]
        first = specs[0]
        for i, spec in zip(holders, specs):
            if _module_shape(adapters[i], spec) != _module_shape(adapters[holders[0]], first):
                raise LoraLegoError(
                    f"has ΔW of shape {spec.d_out}x{spec.d_in} ({spec.kind}) but {adapters[holders[0]].label} "
                    f"has {first.d_out}x{first.d_in} ({first.kind}); were they trained on different base models?",
                    path=adapters[i].label, module=name)
        if m.equal_ranks and len({s.rank for s in specs}) > 1:
            raise LoraLegoError(f"{m.name} needs equal ranks, but the inputs have ranks "
                                f"{', '.join(str(s.rank) for s in specs)}; use lego, linear or concat instead", module=name)
        if len(holders) < len(adapters):
            partial[name] = holders
        dtypes.update(s.dtype for s in specs)
        templates[name] = first
        return holders

    def job(name: str, holders: list[int], read: Future) -> ModuleJob:
        factors, prepared = read.result()
        gen = torch.Generator(device=dev)
        gen.manual_seed(module_seed(seed, name))
        return ModuleJob(factors, [weights[i] for i in holders], gen, prepared)

    # modules whose finish step is queued in the reader thread, in order; the main thread takes back a step
    # the reader has not started while it waits for the reader (see steal)
    finishing: list[_Finishing] = []

    def keep(name: str, result: Factors) -> None:
        if not (_all_finite(result.A) and _all_finite(result.B)):
            raise LoraLegoError(f"{m.name} produced NaN or Inf", module=name)
        out[name] = Factors(result.A.to("cpu", torch.float32), result.B.to("cpu", torch.float32))
        if progress is not None:
            progress(len(out), len(names), name)

    def merge_batch(batch: list[tuple[str, ModuleJob]], reader: ThreadPoolExecutor) -> None:
        """Merge the modules of ``batch``, in one ``fn_many`` call where the method has one; keep them, or
        queue their finish step behind the next batch's reading. Modules the CLI's prefetch workers merged
        already are kept as they come, in order."""
        jobs = [j for _, j in batch if not isinstance(j.prepared, _Merged)]
        if not jobs:
            results = []
        elif m.fn_many is not None:
            results = m.fn_many(jobs, rank, **opts, **({"finish_later": True} if m.finish is not None else {}))
        else:
            results = [m.fn(j.factors, j.weights, rank, generator=j.generator, **opts,
                            **({"prepared": j.prepared} if j.prepared is not None else {})) for j in jobs]
        computed = iter(results)
        for name, j in batch:
            if isinstance(j.prepared, _Merged):
                if m.finish is None:
                    keep(name, j.prepared.factors)
                    continue
                finished: Future = Future()
                finished.set_result(j.prepared.factors)
                finishing.append(_Finishing(name, finished, None))
            elif m.fn_many is not None and m.finish is not None:
                result = next(computed)
                finishing.append(_Finishing(name, reader.submit(m.finish, result), result))
            else:
                keep(name, next(computed))

    def finish_here(entry: _Finishing) -> None:
        """Run a queued finish step in this thread if the reader has not started it (with the reader's torch
        thread count: the result must not depend on which thread ran it)."""
        if entry.unfinished is not None and entry.future.cancel():
            if reader_threads != main_threads:
                torch.set_num_threads(reader_threads)
            try:
                result = m.finish(entry.unfinished)
            finally:
                torch.set_num_threads(main_threads)
            entry.future = Future()
            entry.future.set_result(result)
        entry.unfinished = None  # no longer needed here (a step the reader runs holds its own reference)

    def steal(read: Future) -> None:
        """While the reader is still reading what the next batch needs, do the finish steps queued behind it
        here: the reader then keeps up (without the CLI's prefetched Grams, reading and multiplying them is
        the longer of the two threads' work), and where it is the faster one it does them itself."""
        for entry in finishing:
            if read.done():
                return
            finish_here(entry)

    def keep_finished(wait: bool) -> None:
        """Keep the finished modules in order (all of them, waiting, with ``wait``)."""
        while finishing and (wait or finishing[0].future.done()):
            entry = finishing.pop(0)
            if wait:
                finish_here(entry)
            keep(entry.name, entry.future.result())

    def read_module(name: str) -> tuple[list[Factors], Any]:
        """Read and check one module's factors from every input that has it, move them to the device
        and run the method's ``prepare`` on them (in the helper thread)."""
        holders = holders_of[name]
        specs = [adapters[i].modules[name] for i in holders]
        stackable = dev.type == "cpu" and len({(s.d_in, s.d_out) for s in specs}) == 1
        # what the CLI's prefetch workers planned for (checked against the plan by take_merged / take)
        ahead = gram_prefetch is not None and stackable and len(holders) == len(adapters)
        planned = ([s.rank for s in specs], specs[0].d_in, specs[0].d_out, [s.scale for s in specs])
        if ahead and gram_prefetch.use_merged:
            merged = gram_prefetch.take_merged(name, *planned)
            if merged is not None:
                return [], _Merged(Factors(*(torch.from_numpy(x) for x in merged)))
        stacked = None
        if stackable:
            # every input's factors converted straight into one stacked A (P x d_in) and B (d_out x P), which
            # stack_factors then takes as they are (lowrank.join): no per-input float32 copies to stack
            P = sum(s.rank for s in specs)
            stacked = torch.empty(P, specs[0].d_in), torch.empty(specs[0].d_out, P)
        factors = []
        row = 0
        for i, spec in zip(holders, specs):
            if stacked is None:
                factors.append(adapters[i].factors(name))
                _check_magnitude(factors[-1], weights[i], adapters[i].label, name)
                continue
            factors.append(adapters[i].factors(name, out=(stacked[0][row:row + spec.rank],
                                                          stacked[1][:, row:row + spec.rank])))
            row += spec.rank
        if stacked is not None and not _stacked_within_range(stacked, [weights[i] for i in holders]):
            # NaN, Inf or a value too large somewhere: each input read again with every check, for the error
            # that names the file and what is wrong
            for i in holders:
                _check_magnitude(adapters[i].factors(name), weights[i], adapters[i].label, name)
        if dev.type != "cpu":
            factors = [f.to(dev) for f in factors]
        if m.prepare is None:
            return factors, None
        if ahead:
            known = gram_prefetch.take(name, *planned)
            if known is not None:
                return factors, m.prepare(factors, known=tuple(torch.from_numpy(x) for x in known))
        return factors, m.prepare(factors)

    # Modules are read, checked and prepared in a helper thread (reading, converting to float32, the value
    # checks and lego's Gram products use another core; file reads and torch release the GIL) while the
    # batch before them merges; a method's finish step (lego: forming the centroids) is queued there too,
    # behind the next batch's reading, and taken back by the main thread while it waits (``steal``), so
    # that whichever thread has time does it. At most three batches' factors are held. The two threads
    # share the caller's torch threads (see ``split_threads``): each with a full team of its own, they
    # would oversubscribe the cores.
    batches = plan_batches(names, adapters, m.fn_many is not None)
    caller_threads = torch.get_num_threads()
    reader_threads, main_threads = split_threads(caller_threads)
    with ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(reader_threads,)) as reader:
        def submit(batch: list[str]) -> list[tuple[str, Future]]:
            return [(name, reader.submit(read_module, name)) for name in batch]

        torch.set_num_threads(main_threads)
        try:
            upcoming = submit(batches[0]) if batches else []
            for i in range(len(batches)):
                current = upcoming
                upcoming = submit(batches[i + 1]) if i + 1 < len(batches) else []
                if current:
                    steal(current[-1][1])
                merge_batch([(name, job(name, check_module(name), read)) for name, read in current], reader)
                keep_finished(wait=False)
            keep_finished(wait=True)
        finally:
            torch.set_num_threads(caller_threads)

    base_models = [a.base_model for a in adapters if a.base_model]
    config = _output_config(adapters)
    provenance = {
        "tool": f"lora-lego {__version__}",
        "method": m.name,
        "rank": rank,
        "weights": weights,
        "seed": seed,
        "options": opts,
        "inputs": [a.label for a in adapters],
    }
    if partial:
        provenance["modules_from_some_inputs"] = partial
    return Adapter.from_factors(
        out,
        dtype=widest_dtype(dtypes) if dtypes else torch.float32,
        kinds=templates,
        format=adapters[0].format,
        base_model=base_models[0] if base_models else None,
        config=config,
        metadata={"lora_lego": json.dumps(provenance, sort_keys=True)},
    )


@dataclass
class _Merged:
    """A module's factors as the CLI's prefetch workers merged them (in place of the method's prepared input)."""

    factors: Factors


@dataclass
class _Finishing:
    """A module whose method's finish step was queued in the reader thread."""

    name: str
    future: Future  # the step's result (replaced by a done one where the main thread ran it itself)
    unfinished: Any  # what the step turns into the module's factors, until the step is taken or left


def split_threads(total: int) -> tuple[int, int]:
    """torch threads for the reader thread and for the merging (main) thread out of the caller's ``total``:
    half each, at least one. torch's OpenMP thread count is per calling thread (``torch.set_num_threads`` in
    one thread leaves the others' teams as they are), and a thread that Python starts gets the process
    default (OMP_NUM_THREADS, or one per core), not the caller's choice. With 2 threads given, a team of 2
    for each of the two threads ran 4 threads on 2 cores: the merge took more CPU and was slower than with
    1 thread (benchmarks/speed/NOTES.md)."""
    reader = max(1, total // 2)
    return reader, max(1, total - reader)


def plan_batches(names: list[str], adapters: Sequence[Adapter], batched: bool) -> list[list[str]]:
    """Consecutive modules in batches of at most BATCH_MODULES and BATCH_BYTES of float32 factors (a larger
    module alone), or one module each where the method has no fn_many."""
    batches: list[list[str]] = []
    size = 0
    for name in names:
        nbytes = 4 * sum(a.modules[name].rank * (a.modules[name].d_in + a.modules[name].d_out)
                         for a in adapters if name in a.modules)
        if batches and batched and len(batches[-1]) < BATCH_MODULES and size + nbytes <= BATCH_BYTES:
            batches[-1].append(name)
            size += nbytes
        else:
            batches.append([name])
            size = nbytes
    return batches


def prune(adapter: Adapter, rank: int, seed: int = 0, device: str | torch.device = "cpu",
          progress: ProgressFn | None = None, gram_prefetch: GramPrefetch | None = None, **options: Any) -> Adapter:
    """Reduce one adapter to rank ``rank`` by clustering its own units (LoRA-LEGO with one input)."""
    if rank is None:
        if gram_prefetch is not None:
            gram_prefetch.close()
        raise LoraLegoError("prune needs --rank")
    return merge([adapter], method="lego", rank=rank, weights=[1.0], seed=seed, device=device,
                 progress=progress, gram_prefetch=gram_prefetch, **options)


def _check_magnitude(f: Factors, weight: float, label: str, name: str) -> None:
    """Refuse values so large that the float32 math (squared distances in k-means, sums) would overflow:
    finite, but only a corrupt file or an absurd alpha or weight makes them."""
    peak = max((largest_magnitude(t) for t in (f.A, f.B) if t.numel()), default=0.0) * max(1.0, abs(weight))
    if peak > MAX_ABS:
        raise LoraLegoError(f"a factor value with its scale and weight reaches {peak:.3g}, beyond the {MAX_ABS:.0e} "
                            "that merging handles in float32 (a corrupt file, or an absurd lora_alpha or weight?)",
                            path=label, module=name)


def _stacked_within_range(stacked: tuple[torch.Tensor, torch.Tensor], weights: list[float]) -> bool:
    """Every value of a module's stacked factors finite and within what ``_check_magnitude`` allows, with the
    largest weight: one pass over each contiguous stack (per input, over the strided column blocks of B,
    the same checks took longer than the copies saved)."""
    peak = 0.0
    for t in stacked:
        if t.numel():
            m = largest_magnitude(t)  # NaN where t holds a NaN
            peak = math.inf if math.isnan(m) else max(peak, m)
    return math.isfinite(peak) and peak * max([1.0] + [abs(w) for w in weights]) <= MAX_ABS


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: a NaN or Inf anywhere makes the sum one, so a finite sum settles it in one
    pass with nothing allocated (isfinite(t).all() took 0.19 s of the main thread on the 8 x 7B set);
    a sum that overflows with every value finite falls back to the full check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_compatible_configs(adapters: Sequence[Adapter]) -> None:
    fifo = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fifo) > 1:
        raise LoraLegoError("inputs disagree on fan_in_fan_out; they target different kinds of layers",
                            path=adapters[0].label)


def _output_config(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """A config template for the writer: the first input's, with target_modules joined over inputs and
    per-layer restrictions kept only where every input has the same ones."""
    config = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted({x for t in targets for x in t})
    elif len({json.dumps(t, sort_keys=True) for t in targets}) > 1:
        config.pop("target_modules", None)  # the writer derives it from the modules written
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "task_type"):
        if len({json.dumps(a.config.get(key), sort_keys=True) for a in adapters}) > 1:
            config.pop(key, None)
    for key in ("rank_pattern", "alpha_pattern", "r", "lora_alpha", "use_rslora", "revision"):
        config.pop(key, None)
    return config
