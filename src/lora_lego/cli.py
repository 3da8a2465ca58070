"""Command-line interface: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import LoraLegoError
from .methods import METHODS

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other refusal
        raise LoraLegoError(f"{message} (see {self.prog} --help)")


def _all_method_options():
    seen = {}
    for m in METHODS.values():
        for o in m.options:
            seen.setdefault(o.name, (o, []))[1].append(m.name)
    return seen


def _add_common(p: argparse.ArgumentParser, with_method: bool) -> None:
    p.add_argument("-o", "--output", required=True, type=Path, help="output adapter folder")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where the math runs (default cpu; auto = cuda when available)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
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
    p.add_argument("inputs", nargs="+", type=Path, help="input adapters (PEFT folders)")
    p.add_argument("--method", default="lego", help="merge method (default lego; see `lora-lego methods`)")
    p.add_argument("--rank", type=int, default=None, help="output rank (default: the largest input rank)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per input, negatives allowed (default: the method's, 1 each or 1/N)")
    _add_common(p, with_method=True)

    p = sub.add_parser("prune", help="reduce one adapter's rank by clustering its units")
    p.add_argument("input", type=Path, help="input adapter")
    p.add_argument("--rank", type=int, required=True, help="output rank")
    _add_common(p, with_method=False)

    sub.add_parser("methods", help="list merge methods")
    return parser


def _method_options(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def _run(argv: Sequence[str] | None) -> int:
    from . import load_adapter, merge, prune, save_adapter

    args = build_parser().parse_args(argv)
    if args.command == "methods":
        width = max(len(n) for n in METHODS)
        for m in METHODS.values():
            print(f"{m.name:<{width}}  {m.summary}")
        return 0

    say = (lambda *_a, **_k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    inputs = args.inputs if args.command == "merge" else [args.input]
    from .output import check_output_path

    check_output_path(args.output, inputs, args.force)  # refuse before any work
    adapters = [load_adapter(p) for p in inputs]
    opts = _method_options(args)
    if args.command == "merge":
        merged = merge(adapters, method=args.method, rank=args.rank, weights=args.weights, seed=args.seed,
                       device=args.device, **opts)
        what = f"merged {len(adapters)} adapter(s) with {args.method}"
    else:
        merged = prune(adapters[0], rank=args.rank, seed=args.seed, device=args.device, **opts)
        what = f"pruned {args.input} to rank {args.rank}"
    dtype = save_adapter(merged, args.output, force=args.force, inputs=inputs,
                         warn=lambda msg: print(f"lora-lego: warning: {msg}", file=sys.stderr))
    ranks = sorted({s.rank for s in merged.modules.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    say(f"{what}: {len(merged.modules)} modules, rank {rank_text}, {str(dtype).replace('torch.', '')}, "
        f"-> {args.output} ({time.perf_counter() - start:.2f} s)")
    note = partial_modules_note(merged, inputs)
    if note:
        say(note)
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
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
