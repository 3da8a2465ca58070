"""Recipes, convert, inspect, compare and the progress bar, through the command line."""

import io
import json

import pytest
import torch
from helpers import random_adapter, random_modules, write_peft
from safetensors import safe_open

from lora_lego import load_adapter, merge
from lora_lego.cli import main
from lora_lego.errors import LoraLegoError
from lora_lego.progress import ProgressBar
from lora_lego.recipe import load_recipe


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def deltas(path):
    ad = load_adapter(path)
    return {n: ad.factors(n).delta() for n in ad.modules}


RECIPE = """\
method: lego
rank: 3
seed: 7
options: {param_reweight: halves}
adapters:
  - path: in/a
    weight: 1.0
  - path: in/b
    weight: -0.5
"""


def test_recipe_equals_the_same_flags_and_is_recorded(tmp_path):
    random_adapter(tmp_path / "in" / "a", seed=0)
    random_adapter(tmp_path / "in" / "b", seed=1)
    (tmp_path / "r").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    # paths are relative to the recipe, not to the working directory
    assert main(["merge", "--config", str(recipe), "-o", str(tmp_path / "out-recipe"), "-q"]) == 0
    assert main(["merge", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b"), "-o", str(tmp_path / "out-flags"),
                 "--rank", "3", "--seed", "7", "--param-reweight", "halves", "--weights", "1", "-0.5", "-q"]) == 0
    a, b = deltas(tmp_path / "out-recipe"), deltas(tmp_path / "out-flags")
    assert all(torch.equal(a[n], b[n]) for n in a)
    meta = metadata(tmp_path / "out-recipe" / "adapter_model.safetensors")
    import yaml

    used = yaml.safe_load(meta["lora_lego_recipe"])
    assert used["rank"] == 3 and used["seed"] == 7 and used["options"]["param_reweight"] == "halves"
    assert [x["path"] for x in used["adapters"]] == ["in/a", "in/b"] and used["adapters"][1]["weight"] == -0.5
    assert meta["lora_lego_version"]
    card = (tmp_path / "out-recipe" / "README.md").read_text()
    assert "## Recipe" in card and "param_reweight: halves" in card and "library_name: peft" in card


def test_flags_override_the_recipe(tmp_path):
    random_adapter(tmp_path / "in" / "a", seed=0)
    random_adapter(tmp_path / "in" / "b", seed=1)
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert main(["merge", "--config", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o"), "--rank", "2",
                 "--param-reweight", "none", "-q"]) == 0
    used = json.loads(metadata(tmp_path / "o" / "adapter_model.safetensors")["lora_lego"])
    assert used["rank"] == 2 and used["options"]["param_reweight"] == "none" and used["seed"] == 7
    assert used["weights"] == [1.0, -0.5]
    (tmp_path / "bad.yaml").write_text(RECIPE.replace("{param_reweight: halves}", "{n_init: ten}"))
    assert main(["merge", "--config", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("text, message", [
    ("method: lego\n", "adapters must be a non-empty list"),
    ("adapters: [a]\nbogus: 1\n", r"unknown recipe key\(s\) bogus"),
    ("adapters: [{path: a, weight: x}]\n", "weight must be a number"),
    ("adapters: [a]\nrank: two\n", "rank must be a whole number"),
    ("adapters: [a\n", "is not valid YAML"),
])
def test_bad_recipes_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(LoraLegoError, match=message) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "\n" not in str(e.value) and "r.yaml" in str(e.value)


def test_convert_and_compare(tmp_path, capsys):
    from helpers import tiny_unet, unet_lora, write_kohya

    pytest.importorskip("diffusers")
    src = write_kohya(tmp_path / "k.safetensors", unet_lora(tiny_unet(), 4, seed=0), alpha=2.0)
    assert main(["convert", str(src), "--format", "diffusers", "-o", str(tmp_path / "d.safetensors"), "-q"]) == 0
    assert load_adapter(tmp_path / "d.safetensors").format == "diffusers"
    capsys.readouterr()
    assert main(["compare", str(src), str(tmp_path / "d.safetensors"), "--tol", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "7 module(s) compared" in out and "unet.mid_block.resnets.0.conv1" in out
    # a lossy prune is caught by --tol, and its error is what the factors say
    assert main(["prune", str(src), "--rank", "2", "-o", str(tmp_path / "p.safetensors"), "-q"]) == 0
    assert main(["compare", str(src), str(tmp_path / "p.safetensors"), "--tol", "1e-6"]) == 1
    x, y = load_adapter(src), load_adapter(tmp_path / "p.safetensors")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    dx, dy = x.factors(name).delta(), y.factors(name).delta()
    expected = float((dy - dx).norm() / dx.norm())
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(name + " "))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-4)


def test_inspect_table_and_plot(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    # a module of rank 4 whose ΔW has rank 1: effective rank 1, and a known norm
    a, b = torch.randn(1, 16, generator=g), torch.randn(24, 1, generator=g)
    mods = random_modules(4, 0)
    mods["model.layers.0.self_attn.q_proj"] = (a.repeat(4, 1), b.repeat(1, 4) / 4)
    path = write_peft(tmp_path / "a", mods, r=4, alpha=8)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: peft" in out and "base model: tiny-test-model" in out
    row = next(l for l in out.splitlines() if "q_proj" in l).split()
    assert row[3:6] == ["4", "8", "2"]  # rank, alpha, scale
    assert float(row[6]) == pytest.approx(float((2 * b @ a).norm()), rel=1e-3)
    assert float(row[7]) == pytest.approx(1.0, abs=1e-3)
    pytest.importorskip("matplotlib")
    other = random_adapter(tmp_path / "b", seed=3)
    assert main(["inspect", str(path), str(other), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_draws_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    t = [0.0]
    stream = Tty()
    bar = ProgressBar(stream, delay=1.0, clock=lambda: t[0])
    bar(1, 4, "m1")
    assert stream.getvalue() == ""  # quick merges draw nothing
    t[0] = 2.0
    bar(2, 4, "m2")
    t[0] = 3.0
    bar(4, 4, "m4")
    text = stream.getvalue()
    assert "2/4 modules" in text and "4/4 modules" in text and text.endswith("\n")
    piped = io.StringIO()
    t[0] = 0.0
    quiet = ProgressBar(piped, delay=0.0, clock=lambda: t[0])
    quiet(1, 1, "m")
    assert piped.getvalue() == ""
    # merge() reports every module to it
    calls = []
    merge([load_adapter_from_modules()], progress=lambda d, n, name: calls.append((d, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def load_adapter_from_modules():
    from lora_lego import Adapter, Factors

    mods = random_modules(2, 0)
    return Adapter.from_factors({n: Factors(A, B) for n, (A, B) in mods.items()})


def test_output_the_format_cannot_take_is_refused_before_work(tmp_path, capsys):
    from helpers import write_kohya

    g = torch.Generator().manual_seed(0)
    src = write_kohya(tmp_path / "k.safetensors", {"down_blocks.0.attentions.0.proj_in": (
        torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}, alpha=2.0)
    peft = random_adapter(tmp_path / "llm")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in ((["merge", str(src), "-o", str(tmp_path / "out")], "ending in .safetensors"),
                          (["merge", str(src), "-o", str(tmp_path / "o.safetensors"), "--format", "peft"], "is a folder"),
                          (["convert", str(peft), "-o", str(tmp_path / "o.safetensors"), "--format", "kohya"],
                           "which diffusion pipeline component")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_draws_the_bar_on_a_terminal_unless_quiet(tmp_path, monkeypatch):
    import sys

    class Tty(io.StringIO):
        def isatty(self):
            return True

    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    monkeypatch.setitem(ProgressBar.__init__.__kwdefaults__, "delay", 0.0)  # draw at once, for the test
    for quiet in (False, True):
        tty = Tty()
        monkeypatch.setattr(sys, "stderr", tty)
        assert main(["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--force"] + (["-q"] if quiet else [])) == 0
        assert ("3/3 modules" in tty.getvalue()) is (not quiet)
