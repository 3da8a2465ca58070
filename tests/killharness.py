"""Kill `lora-lego` with SIGKILL at every step of writing its output, one run per step.

Usage: python killharness.py SPEC.json. SPEC has "argv" (the CLI arguments), "target" (the output folder),
"previous" (a folder copied to the target before each run, or null), "results" (where to write them) and
"signal" (SIGKILL, the default, or e.g. SIGTERM).

The parent imports lora_lego (and torch) once and then forks one child per kill point; it runs no torch
operation itself, so the forks are safe. Child n runs the real CLI with an audit hook and a profile hook
that count the file-system steps on its own output (mkdir, open, each write call, rename, the renameat2
look-up, removal) and send the signal to the child at step n. Runs go on until one finishes before step n.
After each run the parent records what a user would find: the target's files and their hashes, and the
leftover temporaries beside it. Nothing is cleaned between runs, so the next run must clean them itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def install_kill_at(n: int, target: Path, log_fd: int, sig: int = signal.SIGKILL) -> None:
    from lora_lego.output import PARTIAL_TAG

    own = f".{target.name}{PARTIAL_TAG}{os.getpid()}"
    parent = str(target.parent)
    count = 0

    def ours(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        p = os.fsdecode(path)
        return p == str(target) or p == parent or any(part in (own, own + ".old") for part in Path(p).parts)

    def step(what: str) -> None:
        nonlocal count
        count += 1
        if count == n:
            os.write(log_fd, (what + "\n").encode())  # os.write raises no audit event
            os.kill(os.getpid(), sig)

    def audit(event: str, args: tuple) -> None:
        if event in ("open", "os.mkdir", "os.rmdir", "os.remove", "shutil.rmtree") and ours(args[0]):
            step(f"{event} {os.fsdecode(args[0])}")
            if event == "os.mkdir" and Path(os.fsdecode(args[0])).name == own:
                sys.setprofile(profile)  # count write calls from here on (profiling the whole merge is slow)
        elif event == "os.rename" and (ours(args[0]) or ours(args[1])):
            step(f"{event} {os.fsdecode(args[0])} -> {os.fsdecode(args[1])}")
        elif event == "ctypes.dlsym" and args[1] == "renameat2":
            step("renameat2")

    def profile(frame, event, arg) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "write":
            name = getattr(getattr(arg, "__self__", None), "name", None)
            if isinstance(name, str) and ours(name):
                step(f"write {name}")

    sys.addaudithook(audit)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    target = Path(spec["target"])
    previous = Path(spec["previous"]) if spec.get("previous") else None
    from lora_lego.cli import main as cli_main
    from lora_lego.output import PARTIAL_TAG

    results = []
    for n in range(1, 1000):
        if target.exists():
            shutil.rmtree(target)
        if previous is not None:
            shutil.copytree(previous, target)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            rc = 99
            try:
                install_kill_at(n, target, write_fd, getattr(signal, spec.get("signal", "SIGKILL")))
                rc = cli_main(spec["argv"])
            finally:
                os._exit(100 + rc)  # never return into the parent's loop
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            event = r.read().strip()
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        beside = target.parent.iterdir() if target.parent.exists() else []  # killed before making the folder
        partials = sorted(p.name for p in beside if p.name.startswith(f".{target.name}{PARTIAL_TAG}"))
        results.append({"n": n, "pid": pid, "killed": killed, "event": event,
                        "exit": None if killed else os.WEXITSTATUS(status) - 100,
                        "target": snapshot(target), "partials": partials})
        if not event:  # the run finished before reaching step n
            break
    Path(spec["results"]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
