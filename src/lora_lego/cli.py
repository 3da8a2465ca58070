"""Command-line interface: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import LoraLegoError
from .methods import METHODS
from .prefetch import keep_freed_memory

EXIT_BAD_INPUT = 2
EXIT_TOO_DIFFERENT = 1
FORMAT_CHOICES = ("peft", "kohya", "diffusers")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other refusal
        raise LoraLegoError(f"{message} (see {self.prog} --help)")


def _all_method_options():
    seen = {}
    for m in METHODS.values():
        for o in m.options:
            seen.setdefault(o.name, (o, []))[1].append(m.name)
    return seen


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output: a folder (peft; diffusers without .safetensors) or a .safetensors file (kohya, diffusers)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default=None,
                   help="output format (default: the inputs'); converts module names where they allow it")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress bar)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def _add_common(p: argparse.ArgumentParser, with_method: bool) -> None:
    _add_output(p)
    p.add_argument("--seed", type=int, default=None, help="seed for every random choice (default 0)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"),
                   help="where the math runs (default cpu; auto = cuda when available)")
    group = p.add_argument_group("method options")
    for name, (opt, owners) in _all_method_options().items():
        if not with_method and "lego" not in owners:
            continue
        kwargs = dict(dest=f"opt_{name}", default=None, type=opt.type, metavar=name.upper() if not opt.choices else None,
                      help=f"{opt.help} (default {opt.default}; methods: {', '.join(owners)})")
        if opt.choices:
            kwargs["choices"] = opt.choices
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-lego", description="Merge LoRA adapters by rank-wise clustering (LoRA-LEGO).")
    parser.add_argument("--version", action="version", version=f"lora-lego {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("merge", help="merge several adapters into one")
    p.add_argument("inputs", nargs="*", type=Path,
                   help="input adapters: PEFT folders, kohya or diffusers .safetensors files (or --config)")
    p.add_argument("--config", type=Path, default=None,
                   help="a YAML recipe (method, rank, options, adapters with path and weight); flags override it")
    p.add_argument("--method", default=None, help="merge method (default lego; see `lora-lego methods`)")
    p.add_argument("--rank", type=int, default=None, help="output rank (default: the largest input rank)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per input, negatives allowed (default: the method's, 1 each or 1/N)")
    _add_common(p, with_method=True)

    p = sub.add_parser("prune", help="reduce one adapter's rank by clustering its units")
    p.add_argument("input", type=Path, help="input adapter")
    p.add_argument("--rank", type=int, required=True, help="output rank")
    _add_common(p, with_method=False)

    p = sub.add_parser("convert", help="write an adapter in another format (same ΔW, renamed modules)")
    p.add_argument("input", type=Path, help="input adapter")
    _add_output(p)

    p = sub.add_parser("inspect", help="format, base model and per-module rank, alpha, scale, ‖ΔW‖, effective rank")
    p.add_argument("inputs", nargs="+", type=Path, help="one or more adapters")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG of the per-module picture (needs matplotlib)")
    p.add_argument("--module", default=None, help="the module whose unit clusters the plot shows (several adapters)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")

    p = sub.add_parser("compare", help="per-module relative error of ΔW between two adapters")
    p.add_argument("reference", type=Path, help="adapter X (the reference)")
    p.add_argument("other", type=Path, help="adapter Y")
    p.add_argument("--tol", type=float, default=None,
                   help="exit 1 when a module's relative error exceeds TOL or a module is in one adapter only")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")

    sub.add_parser("methods", help="list merge methods")
    return parser


def _method_options(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def _say(args):
    return (lambda *_a, **_k: None) if getattr(args, "quiet", False) else (lambda msg: print(msg, file=sys.stderr))


def _warn(msg: str) -> None:
    print(f"lora-lego: warning: {msg}", file=sys.stderr)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        width = max(len(n) for n in METHODS)
        for m in METHODS.values():
            print(f"{m.name:<{width}}  {m.summary}")
        return 0
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "convert":
        return _convert(args)
    return _merge_or_prune(args)


def _merge_or_prune(args: argparse.Namespace) -> int:
    from . import load_adapter, merge, prefetch, prune, save_adapter
    from .merge import default_weights
    from .methods import get_method
    from .output import check_output_path
    from .progress import ProgressBar

    say = _say(args)
    start = time.perf_counter()
    recipe = None
    if args.command == "merge" and args.config is not None:
        from .recipe import load_recipe

        recipe = load_recipe(args.config)
    if args.command == "merge":
        inputs = list(args.inputs) or (list(recipe.adapters) if recipe else [])
        if not inputs:
            raise LoraLegoError("no input adapters: give their paths or a --config recipe")
        method = args.method or (recipe.method if recipe else None) or "lego"
        rank = args.rank if args.rank is not None else (recipe.rank if recipe else None)
        weights = args.weights
        if weights is None and recipe is not None and not args.inputs and any(w is not None for w in recipe.weights):
            defaults = default_weights(get_method(method), len(inputs))
            weights = [d if w is None else w for w, d in zip(recipe.weights, defaults)]
    else:
        inputs, method, rank, weights = [args.input], "lego", args.rank, [1.0]
    seed = args.seed if args.seed is not None else (recipe.seed if recipe and recipe.seed is not None else 0)
    device = args.device or (recipe.device if recipe else None) or "cpu"
    fmt = args.format or (recipe.format if recipe else None)
    opts = {**(_typed_options(recipe, method) if recipe else {}), **_method_options(args)}

    check_output_path(args.output, inputs, args.force)  # refuse before any work
    adapters = [load_adapter(p) for p in inputs]
    _check_target(args.output, fmt, adapters)
    bar = ProgressBar(enabled=False if args.quiet else None)
    try:
        if args.command == "merge":
            merged = merge(adapters, method=method, rank=rank, weights=weights, seed=seed, device=device,
                           progress=bar, gram_prefetch=prefetch.ACTIVE, **opts)
            what = f"merged {len(adapters)} adapter(s) with {method}"
        else:
            merged = prune(adapters[0], rank=rank, seed=seed, device=device, progress=bar,
                           gram_prefetch=prefetch.ACTIVE, **opts)
            what = f"pruned {args.input} to rank {rank}"
    finally:
        bar.close()
    if recipe is not None:
        import json

        from .recipe import recipe_text

        used = json.loads(merged.metadata["lora_lego"])
        written = recipe.written_paths if not args.inputs else [str(p) for p in inputs]
        merged.metadata["lora_lego_recipe"] = recipe_text(
            method=method, rank=rank, seed=seed, device=device, format=fmt, options=used["options"],
            adapters=written, weights=used["weights"])
        merged.metadata["lora_lego_version"] = __version__
    dtype = save_adapter(merged, args.output, format=fmt, force=args.force, inputs=inputs, warn=_warn)
    ranks = sorted({s.rank for s in merged.modules.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    say(f"{what}: {len(merged.modules)} modules, rank {rank_text}, {str(dtype).replace('torch.', '')}, "
        f"{fmt or merged.format} -> {args.output} ({time.perf_counter() - start:.2f} s)")
    note = partial_modules_note(merged, inputs)
    if note:
        say(note)
    return 0


def _typed_options(recipe, method: str) -> dict:
    """The recipe's method options converted to each option's type, as the flags would be."""
    from .methods import get_method

    known = {o.name: o for o in get_method(method).options}
    out = {}
    for key, value in recipe.options.items():
        opt = known.get(key)
        if opt is not None and not isinstance(value, opt.type):
            try:
                value = opt.type(value)
            except (TypeError, ValueError):
                raise LoraLegoError(f"option {key} must be {opt.type.__name__}, got {value!r}", path=recipe.path) from None
        out[key] = value
    return out


def _check_target(output: Path, fmt: str | None, adapters) -> None:
    """Refuse before merging what the writer would refuse after: an output path the format cannot take, or
    module names that do not convert to the format."""
    from .formats import convert
    from .io import check_output_format

    target = fmt or adapters[0].format
    check_output_format(output, target)
    for adapter in adapters:
        convert(adapter, target)


def _convert(args: argparse.Namespace) -> int:
    from . import load_adapter, save_adapter
    from .output import check_output_path

    check_output_path(args.output, [args.input], args.force)
    adapter = load_adapter(args.input)
    fmt = args.format or adapter.format
    _check_target(args.output, fmt, [adapter])
    dtype = save_adapter(adapter, args.output, format=fmt, force=args.force, inputs=[args.input], warn=_warn)
    _say(args)(f"converted {args.input} ({adapter.format}) to {fmt}: {len(adapter.modules)} modules, "
               f"{str(dtype).replace('torch.', '')} -> {args.output}")
    return 0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _inspect(args: argparse.Namespace) -> int:
    from . import load_adapter
    from .stats import module_stats

    adapters = [load_adapter(p) for p in args.inputs]
    all_stats = []
    for adapter in adapters:
        rows = [module_stats(adapter, name) for name in adapter.modules]
        all_stats.append(rows)
        ranks = sorted({s.rank for s in rows})
        print(f"{adapter.label}")
        print(f"  format: {adapter.format}   base model: {adapter.base_model or 'unknown'}   "
              f"modules: {len(rows)}   ranks: {', '.join(map(str, ranks))}   dtype: {str(adapter.dtype).replace('torch.', '')}")
        width = max([len("module")] + [len(s.name) for s in rows])
        print(f"  {'module':<{width}}  {'kind':<9} {'shape':>11} {'rank':>4} {'alpha':>7} {'scale':>7} {'‖ΔW‖':>9} {'eff.rank':>8}")
        for s in rows:
            shape = f"{s.shape[0]}x{s.shape[1]}"
            print(f"  {s.name:<{width}}  {s.kind:<9} {shape:>11} {s.rank:>4} {_fmt(s.alpha):>7} {_fmt(s.scale):>7} "
                  f"{_fmt(s.norm):>9} {s.effective_rank:>8.2f}")
        print()
    if args.plot is not None:
        from .plot import plot_adapters

        module = plot_adapters(adapters, all_stats, args.plot, args.module)
        print(f"wrote {args.plot}" + (f" (unit clusters of {module})" if module and len(adapters) > 1 else ""))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import math

    from . import load_adapter
    from .formats import convert
    from .stats import relative_error

    x, y = load_adapter(args.reference), load_adapter(args.other)
    if y.format != x.format:
        try:
            y = convert(y, x.format)  # compare the same modules under one naming
        except LoraLegoError:
            pass
    common = [n for n in x.modules if n in y.modules]
    only_x = [n for n in x.modules if n not in y.modules]
    only_y = [n for n in y.modules if n not in x.modules]
    if not common:
        raise LoraLegoError(f"{args.reference} and {args.other} have no module in common "
                            f"(e.g. {next(iter(x.modules))} vs {next(iter(y.modules))})")
    width = max([len("module")] + [len(n) for n in common])
    print(f"{'module':<{width}}  {'rel.error':>10} {'cosine':>8}")
    worst = (-1.0, "")
    for name in common:
        spec_x, spec_y = x.modules[name], y.modules[name]
        if (spec_x.d_out, spec_x.d_in) != (spec_y.d_out, spec_y.d_in):
            raise LoraLegoError(f"ΔW is {spec_x.d_out}x{spec_x.d_in} in {args.reference} but "
                                f"{spec_y.d_out}x{spec_y.d_in} in {args.other}", module=name)
        rel, cos = relative_error(x.factors(name), y.factors(name))
        print(f"{name:<{width}}  {rel:>10.3e} {cos:>8.5f}")
        if rel > worst[0] or math.isnan(rel):
            worst = (rel, name)
    for name in only_x:
        print(f"{name:<{width}}  only in {args.reference}")
    for name in only_y:
        print(f"{name:<{width}}  only in {args.other}")
    print(f"{len(common)} module(s) compared; largest relative error {worst[0]:.3e} ({worst[1]}); "
          f"{len(only_x)} only in X, {len(only_y)} only in Y")
    if args.tol is not None and (worst[0] > args.tol or only_x or only_y or math.isnan(worst[0])):
        return EXIT_TOO_DIFFERENT
    return 0


def partial_modules_note(merged, inputs: Sequence[Path]) -> str | None:
    """One line on modules that only some inputs have (not an error: each is merged from the inputs that
    have it); the output's metadata lists every such module."""
    import json

    provenance = json.loads(merged.metadata.get("lora_lego", "{}"))
    partial = provenance.get("modules_from_some_inputs") or {}
    if not partial:
        return None
    groups: dict[tuple[int, ...], int] = {}
    for holders in partial.values():
        groups[tuple(holders)] = groups.get(tuple(holders), 0) + 1
    parts = [f"{n} only in {', '.join(str(inputs[i]) for i in holders)}"
             for holders, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]
    return (f"note: {len(partial)} of {len(merged.modules)} modules are in only some inputs and were merged from "
            f"those ({'; '.join(parts)}); the output's metadata (lora_lego.modules_from_some_inputs) lists them")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a stopped container), handled like Ctrl-C so the temporary output is removed."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; ``argv`` None: this process is the command (sys.argv), which ends here."""
    code = _main(argv)
    if argv is None:
        _end_process(code)
    return code


def _end_process(code: int) -> None:
    """End the command's process without the interpreter's teardown of torch's modules and objects (~0.1 s
    on this machine: `python -c "import torch"` with gc.freeze() 1.08-1.17 s, with os._exit 0.96-1.01 s):
    the output is written, fsync'ed and renamed by now, and what atexit would do is done here."""
    import os

    from . import prefetch

    if prefetch.ACTIVE is not None:
        prefetch.ACTIVE.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    if argv is None:  # the command itself, not a caller in a longer-lived process
        # the imports' objects (torch's, thousands) are never garbage; set aside, they are not scanned again
        # by every collection that parsing the inputs' headers sets off (0.1 s -> 0.03 s for 8 x Llama-7B)
        gc.freeze()
        keep_freed_memory()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(argv)
    except LoraLegoError as e:
        if debug:
            raise
        print(f"lora-lego: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        print("lora-lego: interrupted; nothing half-written was left", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except BrokenPipeError:  # a table piped into `head`: stop quietly, as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
