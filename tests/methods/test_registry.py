"""Every method is registered, listed by the CLI, and reachable with its options as flags."""

import pytest
from helpers import random_adapter, random_modules, write_peft

from lora_lego import METHODS, load_adapter
from lora_lego.cli import main

BASELINES = ["ensemble", "average", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def test_methods_command_lists_every_method(capsys):
    assert main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed[0] == "lego"
    assert set(BASELINES) | {"lego", "concat"} <= set(listed) and listed == list(METHODS)


def test_default_weights():
    weights = {name: m.default_weight for name, m in METHODS.items()}
    assert {n for n, w in weights.items() if w == "mean"} >= {"ensemble", "average", "linear", "dare_linear", "magnitude_prune"}
    assert all(weights[n] == "one" for n in ("task_arithmetic", "ties", "dare_ties", "concat"))


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_merges_from_the_cli(tmp_path, method):
    paths = [random_adapter(tmp_path / f"a{i}", rank=4, seed=i) for i in range(2)]
    extra = ["--density", "0.6"] if "density" in METHODS[method].option_defaults() else []
    rank = [] if method == "ensemble" else ["--rank", "3"]
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "out"), "--method", method, "-q", *rank, *extra]) == 0
    out = load_adapter(tmp_path / "out")
    assert {s.rank for s in out.modules.values()} == ({8} if method == "ensemble" else {3})


def test_bad_density_and_average_ranks_are_one_line_exit_2(tmp_path, capsys):
    a = random_adapter(tmp_path / "a", rank=4)
    b = write_peft(tmp_path / "b", random_modules(2, 1), r=2, alpha=4)
    for args, message in (([a, a, "--method", "ties", "--density", "0"], "--density must be in (0, 1], got 0.0"),
                          ([a, b, "--method", "average"], "average needs equal ranks")):
        assert main(["merge", *map(str, args), "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
