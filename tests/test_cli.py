import subprocess
import sys

import pytest
from helpers import random_adapter

from lora_lego.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_lego.cli", *map(str, args)], capture_output=True, text=True)


def test_merge_and_prune_commands(tmp_path, capsys):
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--rank", "3", "--weights", "1", "-0.5",
                 "--param-reweight", "halves"]) == 0
    assert "merged 2 adapter(s) with lego" in capsys.readouterr().err
    assert main(["prune", str(a), "-o", str(tmp_path / "p"), "--rank", "2"]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").exists()
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert "lego" in listed and "concat" in listed


@pytest.mark.parametrize("args, message", [
    (["merge", "{a}", "-o", "{out}", "--method", "concat", "--rank", "4"], "--rank does not apply to concat"),
    (["merge", "{a}", "{b}", "-o", "{out}", "--weights", "1"], "--weights has 1 value(s) for 2"),
    (["merge", "{a}", "-o", "{out}", "--method", "bogus"], "unknown method 'bogus'"),
    (["merge", "{missing}", "-o", "{out}"], "no such file or folder"),
    (["merge", "{a}", "-o", "{a}", "--force"], "inputs are never written"),
    (["merge", "{a}", "-o", "{out}", "--rank", "0"], "--rank must be"),
    (["merge", "{a}", "-o", "{out}", "--method", "concat", "--n-init", "3"], "does not apply to method concat"),
    (["merge", "{a}", "-o", "{out}", "--param-reweight", "x"], "invalid choice"),
])
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    paths = {"a": random_adapter(tmp_path / "a"), "b": random_adapter(tmp_path / "b", seed=1),
             "out": tmp_path / "out", "missing": tmp_path / "missing"}
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(*[x.format(**paths) for x in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-lego: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_needs_force(tmp_path):
    a = random_adapter(tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")  # an earlier output
    (tmp_path / "out" / "keep").write_text("x")
    proc = run_cli("merge", a, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "pass --force" in proc.stderr
    assert (tmp_path / "out" / "keep").exists()
    assert run_cli("merge", a, "-o", tmp_path / "out", "--force").returncode == 0
    assert not (tmp_path / "out" / "keep").exists()


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("merge", tmp_path / "missing", "-o", tmp_path / "out", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_the_command_ends_with_everything_it_printed_flushed(tmp_path):
    # the command's process ends with os._exit (no interpreter teardown): what it printed to a pipe and its
    # exit code must survive that, with Python's own buffering (not PYTHONUNBUFFERED)
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-m", "lora_lego.cli", "methods"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "lego" in proc.stdout and "concat" in proc.stdout
    a = random_adapter(tmp_path / "a", seed=0)
    proc = run_cli("merge", a, a, "-o", tmp_path / "m", "--rank", "2")
    assert proc.returncode == 0 and "merged 2 adapter(s) with lego" in proc.stderr
    proc = run_cli("merge", a, "-o", tmp_path / "m2", "--rank", "0")
    assert proc.returncode == 2 and "--rank must be" in proc.stderr
