"""A merge killed (SIGKILL) at any step of writing leaves either no output or the previous one whole, never a
half-written one; the next run removes the temporary it left. See killharness.py for how the kills land."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import random_adapter
from killharness import snapshot

from lora_lego.cli import main

HARNESS = Path(__file__).with_name("killharness.py")


def kill_at_every_step(tmp_path: Path, argv: list[str], target: Path, previous: Path | None,
                       signal: str = "SIGKILL") -> list[dict]:
    spec = tmp_path / "spec.json"
    results = tmp_path / "results.json"
    spec.write_text(json.dumps({"argv": argv, "target": str(target), "results": str(results),
                                "previous": str(previous) if previous else None, "signal": signal}))
    proc = subprocess.run([sys.executable, str(HARNESS), str(spec)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "force-over-previous"])
def test_sigkill_at_every_write_step(tmp_path, capsys, with_previous):
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    target = tmp_path / "out" / "merged"
    # concat: the kills are about writing, and it keeps the ~25 runs to seconds
    argv = ["merge", str(a), str(b), "-o", str(target), "--method", "concat", "--force", "-q"]
    previous = None
    if with_previous:
        previous = tmp_path / "previous"
        assert main(["merge", str(a), str(b), "-o", str(previous), "--method", "concat", "--weights", "1", "-1"]) == 0
    runs = kill_at_every_step(tmp_path, argv, target, previous)
    *killed, last = runs

    # the final run, not killed, completes and leaves no temporary behind
    assert not last["killed"] and last["exit"] == 0 and last["partials"] == []
    new = last["target"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(new)
    old = snapshot(previous) if previous is not None else None
    assert old != new

    # the kills landed on every kind of step: creating, writing each file, verifying, renaming, cleaning
    events = " ".join(r["event"] for r in killed)
    assert all(r["killed"] and r["event"] for r in killed)
    for kind in ("os.mkdir", "write", "adapter_model.safetensors", "adapter_config.json", "renameat2" if old else "os.rename"):
        assert kind in events, (kind, events)
    assert len(killed) >= 12

    for r in killed:
        # either nothing (or the previous output) or the complete new output: never a mix, never partial
        allowed = [new, old] if old is not None else [None, new]
        assert r["target"] in allowed, r
        # at most one temporary: the one this run left; the one the run before left was removed
        assert r["partials"] in ([], [f".merged.lora-lego-partial-{r['pid']}"]), r
    # the new output appears in one step, the rename (or swap) after everything was written and verified
    first_new = next(i for i, r in enumerate(runs) if r["target"] == new)
    assert all(r["target"] == new for r in runs[first_new:])
    assert runs[first_new - 1]["event"].startswith("renameat2" if old else "os.rename")
    written = [i for i, r in enumerate(runs) if r["event"].startswith("write")]
    between = [r["event"] for r in runs[written[-1] + 1:first_new - 1]]
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # opened to sync, and again to verify
        assert sum(e.startswith("open") and e.endswith(name) for e in between) >= 2, between


def test_previous_output_is_put_back_after_a_kill_inside_the_two_step_replacement(tmp_path, capsys):
    """Where the one-step swap is unavailable, --force renames the old output aside, then the new one in.
    A run killed between the two leaves the state built here; the next run restores the old output."""
    a = random_adapter(tmp_path / "a")
    assert main(["merge", str(a), "-o", str(tmp_path / "previous"), "--rank", "2"]) == 0
    old = snapshot(tmp_path / "previous")
    (tmp_path / "previous").rename(tmp_path / ".out.lora-lego-partial-999999.old")
    (tmp_path / ".out.lora-lego-partial-999999").mkdir()  # the new output, never renamed in
    (tmp_path / ".out.lora-lego-partial-999999" / "adapter_model.safetensors").write_bytes(b"new")
    capsys.readouterr()
    assert main(["merge", str(a), "-o", str(tmp_path / "out")]) == 2  # without --force: the old one is back
    assert "pass --force" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


def test_sigterm_at_every_write_step_removes_the_temporary(tmp_path):
    """SIGTERM (kill, timeout, docker stop) is handled like Ctrl-C: exit 143, and the temporary is removed on
    the way out, so not even a leftover remains; the output is the previous one or the complete new one."""
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    target = tmp_path / "out" / "merged"
    previous = tmp_path / "previous"
    assert main(["merge", str(a), str(b), "-o", str(previous), "--method", "concat", "--weights", "1", "-1"]) == 0
    argv = ["merge", str(a), str(b), "-o", str(target), "--method", "concat", "--force", "-q"]
    runs = kill_at_every_step(tmp_path, argv, target, previous, signal="SIGTERM")
    *stopped, last = runs
    assert last["exit"] == 0 and not last["event"]
    old, new = snapshot(previous), last["target"]
    assert len(stopped) >= 12 and old != new
    for r in stopped:
        assert not r["killed"] and r["exit"] == 143, r
        assert r["partials"] == [] and r["target"] in (old, new), r
