"""The CLI's prefetch (prefetch.py): the workers' Grams, signs and merged factors are bit for bit what the
merge computes itself, so a merge that uses them writes the same bytes; anything they were not planned for
(other inputs, other settings) is left alone."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import SHAPES, random_modules, write_peft

from lora_lego import load_adapter, merge, prefetch
from lora_lego.adapter import Factors
from lora_lego.msu import sign_of_largest, stacked_grams

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the prefetch forks (Linux only)")


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "lora_lego.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_float16_conversion_is_exact_for_every_finite_value():
    bits = np.arange(2**16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    out = np.empty(bits.size, np.float32)
    prefetch._to_float32(bits.view(np.uint8), "F16", out, np.empty(bits.size, np.uint32))
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(out[finite].view(np.uint32), want[finite].view(np.uint32))  # subnormals and -0 too
    assert prefetch._conversion_exact()


def test_bfloat16_and_float32_conversion_match_torch():
    t = torch.randn(64, 33) * torch.logspace(-30, 30, 33)
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float32, "F32")):
        raw = t.to(dtype).contiguous().view(torch.uint8).numpy().reshape(-1)
        out = np.empty((64, 33), np.float32)
        prefetch._to_float32(raw, name, out, np.empty(out.size, np.uint32))
        assert np.array_equal(out.view(np.uint32), t.to(dtype).float().numpy().view(np.uint32))


@pytest.mark.parametrize("scale", [0.5, 2.0, 0.3, 1 / 3, 1e-30, 7.77e4])
def test_conversion_times_scale_rounds_once_as_torch_does(scale):
    # the scale folded into the conversion's last product (F16: 2^112 * scale; beyond 2^16 in two steps) gives
    # what the merge's reader computes: the float32 value times float32(scale), rounded once
    bits = np.arange(2**16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    want = (torch.from_numpy(bits.view(np.float16).astype(np.float32)) * scale).numpy()
    cases = [("F16", bits.view(np.uint8), want)]
    t = torch.randn(64, 33) * torch.logspace(-30, 30, 33)
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float32, "F32")):
        cases.append((name, t.to(dtype).contiguous().view(torch.uint8).numpy().reshape(-1),
                      (t.to(dtype).float() * scale).numpy().reshape(-1)))
    for name, raw, expected in cases:
        out = np.empty(expected.size, np.float32)
        with np.errstate(over="ignore"):
            prefetch._to_float32(raw, name, out, np.empty(out.size, np.uint32), scale)
        keep = finite if name == "F16" else slice(None)
        assert np.array_equal(out[keep].view(np.uint32), expected[keep].view(np.uint32)), name


def test_sign_of_largest_matches_msu_on_ties_and_zeros():
    A = torch.randn(40, 9)
    A[3] = 0.0
    A[5, 2], A[5, 7] = -4.0, 4.0  # the first of +m and -m decides: -1
    A[6, 1], A[6, 4] = 4.0, -4.0
    assert np.array_equal(prefetch.sign_of_largest(A.numpy()), sign_of_largest(A).numpy())


def _adapters(tmp_path, specs):
    """PEFT folders from (seed, dtype, config) triples, ranks 4/4/6 and a rank_pattern where asked."""
    paths = []
    for i, (seed, dtype, config) in enumerate(specs):
        ranks = config.get("rank_pattern") and {n: 6 for n in SHAPES if n.endswith("down_proj")}
        paths.append(write_peft(tmp_path / f"a{i}", random_modules(4, seed, ranks=ranks), r=4, alpha=8.0,
                                dtype=dtype, **config))
    return paths


MIXED = [(0, torch.float16, {}), (1, torch.bfloat16, {"use_rslora": True}),
         (2, torch.float32, {"lora_alpha": 3.0, "alpha_pattern": {"v_proj": 5.5}, "rank_pattern": {"down_proj": 6}})]


def test_child_grams_are_bit_identical_to_stacked_grams(tmp_path):
    dirs = _adapters(tmp_path, MIXED)
    plan = prefetch.plan_modules([str(d) for d in dirs])
    assert [m.name for m in plan] == list(SHAPES)
    assert plan[2].ranks == (4, 4, 6)
    results = np.zeros(plan[-1].slot + plan[-1].items)
    prefetch.compute([str(d) for d in dirs], plan, results)  # every batch, Grams only
    adapters = [load_adapter(d) for d in dirs]
    for m in plan:
        factors = [a.factors(m.name) for a in adapters]
        assert list(m.scales) == [a.modules[m.name].scale for a in adapters]
        st = stacked_grams(factors)
        ga, gb, sign = m.gram_views(results)
        assert np.array_equal(ga, st.GA.numpy()) and np.array_equal(gb, st.GB.numpy())
        assert np.array_equal(sign, st.sign.numpy())


def test_plan_skips_what_not_every_input_has_and_respects_the_budget(tmp_path):
    full = random_modules(4, 0)
    a = write_peft(tmp_path / "a", full, r=4, alpha=8.0)
    b = write_peft(tmp_path / "b", {n: f for n, f in full.items() if "v_proj" not in n}, r=4, alpha=8.0)
    plan = prefetch.plan_modules([str(a), str(b)])
    assert [m.name for m in plan] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    one = 8 * plan[0].items
    assert [m.name for m in prefetch.plan_modules([str(a), str(b)], budget=one)] == ["model.layers.0.self_attn.q_proj"]
    assert prefetch.plan_modules([str(a)], budget=0) == []


OPTION_SETS = [{}, {"unit_split": "sqrt", "canonicalize": "sign", "output_reweight": "sqrt"},
               {"param_reweight": "halves", "canonicalize": "none", "n_init": 3},
               {"param_reweight": "sum", "output_reweight": "norm_rms", "canonicalize": "balance", "max_iter": 2}]


def _flags(options):
    return [x for key, value in options.items() for x in ("--" + key.replace("_", "-"), str(value))]


@linux_only
@pytest.mark.parametrize("options", OPTION_SETS)
def test_workers_merge_bit_for_bit_what_the_merge_computes(tmp_path, options):
    dirs = _adapters(tmp_path, MIXED)  # fp16, bf16 and fp32 inputs; rsLoRA, alpha and rank patterns
    adapters = [load_adapter(d) for d in dirs]
    weights = [1.0, -0.5, 2.0]
    plain = merge(adapters, rank=5, weights=weights, seed=3, **options)
    settings = prefetch.lego_settings(["merge", "--rank", "5", "--weights", "1", "-0.5", "2", "--seed", "3",
                                       *_flags(options)], len(dirs))
    handle = prefetch.start(dirs, settings=settings)
    result = merge(adapters, rank=5, weights=weights, seed=3, gram_prefetch=handle, **options)
    assert (handle.merged_taken, handle.taken) == (len(SHAPES), 0)
    for name in SHAPES:
        assert torch.equal(result.factors(name).A, plain.factors(name).A)
        assert torch.equal(result.factors(name).B, plain.factors(name).B)


@linux_only
@pytest.mark.parametrize("case", ["used", "other settings", "other inputs", "dead worker"])
def test_a_merge_with_the_prefetch_writes_the_same(tmp_path, case):
    dirs = _adapters(tmp_path, MIXED)
    adapters = [load_adapter(d) for d in dirs]
    plain = merge(adapters, rank=5, seed=3)
    # planned for two of the three inputs, or with other settings: not used, stopped; a dead worker: whatever it finished before dying is used, the rest computed as usual
    settings = prefetch.lego_settings(["merge", "--rank", "4" if case == "other settings" else "5", "--seed", "3"],
                                      2 if case == "other inputs" else 3)
    handle = prefetch.start(dirs[:2] if case == "other inputs" else dirs, settings=settings)
    if case == "dead worker":
        os.kill(handle._pids[0], 9)
    if case in ("used", "other settings"):
        assert handle.wait() == len(SHAPES)
    result = merge(adapters, rank=5, seed=3, gram_prefetch=handle)
    assert handle._pids == []  # the workers stopped and reaped when the merge ended
    used = {"used": (len(SHAPES), 0), "other settings": (0, 0), "other inputs": (0, 0)}
    assert (handle.merged_taken, handle.taken) == used.get(case, (handle.merged_taken, handle.taken))
    for name in SHAPES:
        assert torch.equal(result.factors(name).A, plain.factors(name).A)
        assert torch.equal(result.factors(name).B, plain.factors(name).B)


@linux_only
def test_modules_beyond_the_budget_are_merged_by_the_merge(tmp_path):
    dirs = _adapters(tmp_path, MIXED)
    adapters = [load_adapter(d) for d in dirs]
    plain = merge(adapters, rank=5, seed=3)
    settings = prefetch.lego_settings(["merge", "--rank", "5", "--seed", "3"], 3)
    first = prefetch.plan_modules(dirs, settings=settings)[0]
    handle = prefetch.start(dirs, budget=8 * first.items, settings=settings)
    assert list(handle.plan) == [first.name]
    result = merge(adapters, rank=5, seed=3, gram_prefetch=handle)
    assert (handle.merged_taken, handle.taken) == (1, 0)
    for name in SHAPES:
        assert torch.equal(result.factors(name).A, plain.factors(name).A)
        assert torch.equal(result.factors(name).B, plain.factors(name).B)


def test_settings_are_read_from_the_command_line_or_not_at_all(tmp_path):
    defaults = tuple(sorted(prefetch.LEGO_DEFAULTS.items()))
    read = prefetch.lego_settings
    assert read(["merge", "a", "b", "-o", "x"], 2) == prefetch.Settings(None, (1.0, 1.0), 0, defaults)
    got = read(["merge", "a", "--weights", "0.5", "-2", "b", "--rank=8", "--seed", "7", "--n-init", "3"], 2)
    assert (got.rank, got.weights, got.seed, dict(got.options)["n_init"]) == (8, (0.5, -2.0), 7, 3)
    assert read(["prune", "a", "--rank", "2", "--canonicalize", "sign"], 1).options != defaults
    assert read(["merge", "a", "--weights=2", "b"], 1).weights == (2.0,)
    for bad in (["merge", "a", "b", "--rank"], ["merge", "a", "b", "--rank", "x"], ["merge", "a", "b", "--weights", "1"],
                ["merge", "a", "b", "--canonicalize", "nope"], ["merge", "a", "b", "--rank", "0"]):
        assert read(bad, 2) is None, bad


@linux_only
def test_cli_merge_and_prune_use_the_prefetch_and_write_the_same_bytes(tmp_path):
    dirs = _adapters(tmp_path, MIXED)
    outs = {}
    for label, env in (("on", {"LORA_LEGO_PREFETCH_STATS": "1"}), ("off", {"LORA_LEGO_PREFETCH": "0"})):
        proc = run_cli("merge", *dirs, "-o", tmp_path / f"m-{label}", "--rank", "5", "--weights", "1", "0.5", "2",
                       "--method", "lego", "--device", "cpu", "-q", **env)
        assert proc.returncode == 0, proc.stderr
        outs[label] = (tmp_path / f"m-{label}" / "adapter_model.safetensors").read_bytes()
        if label == "on":
            assert "3 modules planned, 3 computed, 3 merged and 0 Grams used" in proc.stderr
        proc = run_cli("prune", dirs[2], "-o", tmp_path / f"p-{label}", "--rank", "2", "-q", **env)
        assert proc.returncode == 0, proc.stderr
        if label == "on":
            assert "3 modules planned, 3 computed, 3 merged and 0 Grams used" in proc.stderr
    assert outs["on"] == outs["off"]
    assert (tmp_path / "p-on" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "p-off" / "adapter_model.safetensors").read_bytes()


@linux_only
@pytest.mark.parametrize("extra", [["--rank", "20"], ["--rank", "3", "--weights", "0.5", "0", "-1"],
                                   ["--seed", "9", "--output-reweight", "sqrt"]])
def test_cli_output_is_the_same_with_the_workers_for_more_settings(tmp_path, extra):
    # rank 20 > the pool (14 units): every unit its own cluster; a zero and a negative weight; the default rank
    dirs = _adapters(tmp_path, MIXED)
    outs = {}
    for label, env in (("on", {"LORA_LEGO_PREFETCH_STATS": "1"}), ("off", {"LORA_LEGO_PREFETCH": "0"})):
        out = tmp_path / f"m-{label}"
        proc = run_cli("merge", *dirs, "-o", out, "-q", *extra, **env)
        assert proc.returncode == 0, proc.stderr
        if label == "on":
            assert "3 merged" in proc.stderr
        outs[label] = (out / "adapter_model.safetensors").read_bytes()
    assert outs["on"] == outs["off"]


@linux_only
def test_cli_errors_are_unchanged_with_a_prefetch_running(tmp_path):
    dirs = _adapters(tmp_path, MIXED[:2])
    bad = write_peft(tmp_path / "bad", random_modules(4, 5), r=4, alpha=8.0)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[:-7])  # truncated: the child's plan still reads
    inf = write_peft(tmp_path / "inf", {n: (A, B.clone().index_fill_(1, torch.tensor([1]), float("inf")))
                                        for n, (A, B) in random_modules(4, 6).items()}, r=4, alpha=8.0, dtype=torch.float16)
    for args, message in (([*dirs, "--rank", "0"], "--rank must be"), ([*dirs, bad], "truncated"),
                          ([dirs[0], inf, "--rank", "3"], "lora_B contains Inf")):
        stderr = {}
        for label, env in (("on", {}), ("off", {"LORA_LEGO_PREFETCH": "0"})):
            proc = run_cli("merge", *args, "-o", tmp_path / "m", **env)
            assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr
            assert not (tmp_path / "m").exists()
            stderr[label] = proc.stderr
        assert stderr["on"] == stderr["off"]


def test_conv_modules_are_left_to_the_merge(tmp_path):
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(2):
        modules = random_modules(4, i)
        modules["unet.conv_in"] = (torch.randn(4, 6, 1, 1, generator=g), torch.randn(5, 4, 1, 1, generator=g))
        dirs.append(str(write_peft(tmp_path / f"c{i}", modules, r=4, alpha=8.0, dtype=torch.float16)))
    assert [m.name for m in prefetch.plan_modules(dirs)] == list(SHAPES)


def test_only_lego_merges_of_peft_folders_on_the_cpu_are_prefetched(tmp_path):
    a, b = (str(p) for p in _adapters(tmp_path, MIXED[:2]))
    real = [os.path.realpath(a), os.path.realpath(b)]
    assert prefetch.lego_inputs(["merge", a, b, "-o", "out", "--rank", "4"]) == real
    assert prefetch.lego_inputs(["merge", a, "--method", "lego", b, "--device=cpu", "--weights", "1", "2"]) == real
    assert prefetch.lego_inputs(["prune", a, "-o", "x", "--rank", "2"]) == real[:1]
    assert prefetch.lego_inputs(["merge", a, "-o", b]) == real[:1]  # the output is not an input
    for args in (["merge", a, b, "--method", "linear"], ["merge", a, "--method=ties"], ["merge", a, "--device", "cuda"],
                 ["merge", a, "--device=auto"], ["merge", "--config", "r.yaml"], ["merge", a, "--help"],
                 ["convert", a, "-o", "x"], ["merge", "-o", "x"], []):
        assert prefetch.lego_inputs(args) is None, args


def test_only_the_lora_lego_command_counts_as_the_cli(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "-X", "utf8", "-m", "lora_lego.cli", "merge", "a"], raising=False)
    assert prefetch.cli_arguments() == ["merge", "a"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest", "merge"], raising=False)
    assert prefetch.cli_arguments() is None
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "/venv/bin/lora-lego", "prune", "a"], raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lora-lego", "prune", "a"])
    assert prefetch.cli_arguments() == ["prune", "a"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "script.py", "merge"], raising=False)
    monkeypatch.setattr(sys, "argv", ["script.py", "merge"])
    assert prefetch.cli_arguments() is None


def test_the_prefetch_needs_no_torch():
    # lora_lego/__init__ starts it before importing torch: prefetch.py and what it imports must not need torch
    src = os.path.dirname(prefetch.__file__)
    script = ("import sys, types\n"
              "sys.modules['torch'] = None\n"  # any import of torch fails
              f"pkg = types.ModuleType('lora_lego'); pkg.__path__ = [{src!r}]; sys.modules['lora_lego'] = pkg\n"
              "import lora_lego.prefetch\n"
              "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_finish_later_gives_what_lego_gives(tmp_path):
    from lora_lego.methods import ModuleJob
    from lora_lego.methods.lego import form_centroids, lego_many

    mods = [random_modules(4, s) for s in range(3)]
    name = "model.layers.0.self_attn.q_proj"
    factors = [Factors(A, B) for A, B in (m[name] for m in mods)]

    def jobs():
        return [ModuleJob(factors, [1.0, 1.0, 1.0], torch.Generator().manual_seed(0))]

    now = lego_many(jobs(), 5)[0]
    later = form_centroids(lego_many(jobs(), 5, finish_later=True)[0])
    assert torch.equal(now.A, later.A) and torch.equal(now.B, later.B)
