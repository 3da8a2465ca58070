import importlib
import json
import re

import pytest
import torch
from helpers import SHAPES, permute_units, random_adapter, random_modules, write_peft

from lora_lego import load_adapter, merge, prune, save_adapter
from lora_lego.errors import LoraLegoError


def test_self_merge_invariant_end_to_end(tmp_path):
    mods = random_modules(6, 0)
    paths = [write_peft(tmp_path / f"c{i}", permute_units(mods, i) if i else mods, r=6, alpha=12) for i in range(3)]
    merged = merge([load_adapter(p) for p in paths])
    original = load_adapter(paths[0])
    for name in mods:
        assert merged.modules[name].rank == 6
        assert torch.allclose(merged.factors(name).delta(), original.factors(name).delta(), atol=1e-5)


def test_same_seed_gives_bit_identical_files(tmp_path):
    paths = [random_adapter(tmp_path / f"a{i}", rank=8, seed=i) for i in range(3)]
    outs = []
    for j in range(2):
        merged = merge([load_adapter(p) for p in paths], rank=5, seed=11)
        save_adapter(merged, tmp_path / f"o{j}")
        outs.append((tmp_path / f"o{j}" / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    other = merge([load_adapter(p) for p in paths], rank=5, seed=12)
    again = merge([load_adapter(p) for p in paths], rank=5, seed=11)
    name = next(iter(SHAPES))
    assert torch.equal(again.factors(name).A, merge([load_adapter(p) for p in paths], rank=5, seed=11).factors(name).A)
    assert not torch.equal(other.factors(name).A, again.factors(name).A)


def test_modules_that_only_some_inputs_have(tmp_path):
    full = random_modules(4, 0)
    part = {k: v for k, v in random_modules(4, 1).items() if "q_proj" in k}
    a = write_peft(tmp_path / "a", full, r=4, alpha=4)
    b = write_peft(tmp_path / "b", part, r=4, alpha=4)
    merged = merge([load_adapter(a), load_adapter(b)], method="concat")
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.0.self_attn.v_proj"
    assert merged.modules[q].rank == 8 and merged.modules[v].rank == 4
    assert torch.allclose(merged.factors(v).delta(), full[v][1] @ full[v][0], atol=1e-6)
    prov = json.loads(merged.metadata["lora_lego"])
    assert prov["modules_from_some_inputs"][v] == [0]
    save_adapter(merged, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {q: 8} == cfg["alpha_pattern"]


def test_default_rank_is_largest_input_rank_per_module(tmp_path):
    a = write_peft(tmp_path / "a", random_modules(4, 0), r=4, alpha=4)
    b = write_peft(tmp_path / "b", random_modules(2, 1), r=2, alpha=4)
    merged = merge([load_adapter(a), load_adapter(b)])
    assert {s.rank for s in merged.modules.values()} == {4}


def test_different_base_models_are_refused(tmp_path):
    a = write_peft(tmp_path / "a", random_modules(4, 0), r=4, alpha=4)
    shapes = dict(SHAPES)
    shapes["model.layers.0.self_attn.q_proj"] = (24, 32)
    b = write_peft(tmp_path / "b", random_modules(4, 1, shapes=shapes), r=4, alpha=4)
    with pytest.raises(LoraLegoError, match=r"module model.layers.0.self_attn.q_proj: has ΔW of shape 24x32"):
        merge([load_adapter(a), load_adapter(b)])


def test_option_and_argument_validation(tmp_path):
    ad = load_adapter(random_adapter(tmp_path / "a"))
    with pytest.raises(LoraLegoError, match="--rank does not apply to concat"):
        merge([ad, ad], method="concat", rank=2)
    with pytest.raises(LoraLegoError, match="--weights has 1 value"):
        merge([ad, ad], weights=[1.0])
    with pytest.raises(LoraLegoError, match="unknown method"):
        merge([ad], method="nope")
    with pytest.raises(LoraLegoError, match="--rank must be"):
        merge([ad], rank=0)
    with pytest.raises(LoraLegoError, match="does not apply to method concat"):
        merge([ad], method="concat", param_reweight="joint")
    with pytest.raises(LoraLegoError, match="--param-reweight must be one of"):
        merge([ad], param_reweight="sideways")


def test_prune_to_same_rank_is_exact_and_to_lower_rank_shrinks(tmp_path):
    ad = load_adapter(random_adapter(tmp_path / "a", rank=8))
    same = prune(ad, rank=8)
    low = prune(ad, rank=3)
    for name in SHAPES:
        assert torch.allclose(same.factors(name).delta(), ad.factors(name).delta(), atol=1e-5)
        assert low.modules[name].rank == 3


def test_nan_input_is_refused_naming_file_and_module(tmp_path):
    mods = random_modules(2, 0)
    mods["model.layers.0.self_attn.v_proj"][1][0, 0] = float("nan")
    p = write_peft(tmp_path / "n", mods, r=2, alpha=2)
    with pytest.raises(LoraLegoError, match=r"adapter_model.safetensors: module model.layers.0.self_attn.v_proj: lora_B contains NaN"):
        merge([load_adapter(p)])


def test_batched_merge_gives_each_module_what_lego_gives_it_alone(tmp_path, monkeypatch):
    # modules merged in batches (lego's fn_many: one k-means call for pools of equal size) and one at a
    # time (batches of 1) give bit-identical factors, and each is lego on that module with its own seed
    merge_module = importlib.import_module("lora_lego.merge")  # the attribute lora_lego.merge is the function
    from lora_lego.merge import module_seed
    from lora_lego.methods.lego import lego

    ranks = {"model.layers.0.self_attn.v_proj": 3}  # one module with another pool size in the batch
    paths = [write_peft(tmp_path / f"a{i}", random_modules(4, i, ranks=ranks if i else None), r=4, alpha=8,
                        **({"rank_pattern": ranks} if i else {})) for i in range(3)]
    adapters = [load_adapter(p) for p in paths]
    assert merge_module.plan_batches(list(SHAPES), adapters, True) == [list(SHAPES)]
    batched = merge(adapters, rank=3, seed=5)
    monkeypatch.setattr(merge_module, "BATCH_MODULES", 1)
    assert merge_module.plan_batches(list(SHAPES), adapters, True) == [[n] for n in SHAPES]
    single = merge(adapters, rank=3, seed=5)
    for name in SHAPES:
        assert torch.equal(batched.factors(name).A, single.factors(name).A)
        assert torch.equal(batched.factors(name).B, single.factors(name).B)
        alone = lego([a.factors(name) for a in adapters], [1.0] * 3, 3,
                     generator=torch.Generator().manual_seed(module_seed(5, name)))
        assert torch.equal(batched.factors(name).A, alone.A) and torch.equal(batched.factors(name).B, alone.B)


def test_batches_hold_at_most_the_byte_bound_unless_one_module_is_larger(tmp_path, monkeypatch):
    merge_module = importlib.import_module("lora_lego.merge")  # the attribute lora_lego.merge is the function

    adapters = [load_adapter(random_adapter(tmp_path / f"a{i}", rank=4, seed=i)) for i in range(2)]
    sizes = {n: 4 * 2 * 4 * sum(SHAPES[n]) for n in SHAPES}  # float32, 2 inputs, rank 4, (d_out + d_in)
    monkeypatch.setattr(merge_module, "BATCH_BYTES", sizes["model.layers.0.self_attn.q_proj"]
                        + sizes["model.layers.0.self_attn.v_proj"])
    assert merge_module.plan_batches(list(SHAPES), adapters, True) == [list(SHAPES)[:2], list(SHAPES)[2:]]
    monkeypatch.setattr(merge_module, "BATCH_BYTES", 1)
    assert merge_module.plan_batches(list(SHAPES), adapters, True) == [[n] for n in SHAPES]
    assert merge_module.plan_batches(list(SHAPES), adapters, False) == [[n] for n in SHAPES]


@pytest.mark.parametrize("caller", [1, 2, 4])
def test_reader_and_merging_threads_share_the_callers_torch_threads(tmp_path, monkeypatch, caller):
    # each of the two threads gets its share of the caller's intra-op threads, not a full team (which
    # oversubscribed the cores: 2 threads were slower than 1), and the caller's setting is back afterwards
    import dataclasses
    import threading

    from lora_lego.methods import METHODS
    from lora_lego.msu import stacked_grams

    merge_module = importlib.import_module("lora_lego.merge")
    seen = {}

    def prepare(factors):
        seen["reader"] = (threading.current_thread() is threading.main_thread(), torch.get_num_threads())
        return stacked_grams(factors)

    lego = METHODS["lego"]

    def lego_many(jobs, rank, **options):
        seen["main"] = (threading.current_thread() is threading.main_thread(), torch.get_num_threads())
        return lego.fn_many(jobs, rank, **options)

    monkeypatch.setitem(METHODS, "lego", dataclasses.replace(lego, prepare=prepare, fn_many=lego_many))
    adapters = [load_adapter(random_adapter(tmp_path / f"a{i}", rank=4, seed=i)) for i in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(caller)
    try:
        merge(adapters, rank=2)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    want_reader, want_main = merge_module.split_threads(caller)
    assert (want_reader, want_main) == {1: (1, 1), 2: (1, 1), 4: (2, 2)}[caller]
    assert seen["reader"] == (False, want_reader)
    assert seen["main"] == (True, want_main)
    assert after == caller


def test_a_method_result_with_nan_or_inf_is_refused_and_a_large_finite_one_kept(tmp_path, monkeypatch):
    import dataclasses

    from lora_lego.adapter import Factors
    from lora_lego.merge import _all_finite
    from lora_lego.methods import METHODS

    big = torch.full((2, 3), 3e38)  # finite, but its sum overflows float32
    assert _all_finite(big) and _all_finite(torch.zeros(0, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[1, 2] = bad
        assert not _all_finite(t)
    adapters = [load_adapter(random_adapter(tmp_path / f"a{i}", rank=4, seed=i)) for i in range(2)]
    lego = METHODS["lego"]

    def poisoned(jobs, rank, **options):
        out = lego.fn_many(jobs, rank, **options)
        out[-1] = Factors(out[-1].A, out[-1].B * float("inf"))
        return out

    def poisoned_finish(centroids):  # the finish step, run in the reader thread
        f = lego.finish(centroids)
        return Factors(f.A * float("nan"), f.B)

    for variant in (dict(fn_many=poisoned, finish=None), dict(finish=poisoned_finish)):
        monkeypatch.setitem(METHODS, "lego", dataclasses.replace(lego, **variant))
        with pytest.raises(LoraLegoError, match="produced NaN or Inf"):
            merge(adapters, rank=2)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_reading_into_stacked_factors_gives_the_loaders_values(tmp_path, fmt):
    # the driver's read: each input converted straight into its rows of A and columns of B of one stacked
    # pair; the values are bit for bit those of the plain loader (peft: its own load_into; kohya: copied)
    from helpers import write_kohya

    mods = [random_modules(4, i, ranks={"model.layers.0.self_attn.v_proj": 2} if i else None) for i in range(2)]
    if fmt == "peft":
        paths = [write_peft(tmp_path / f"a{i}", m, r=4, alpha=8, dtype=torch.float16,
                            **({"rank_pattern": {"model.layers.0.self_attn.v_proj": 2}} if i else {}))
                 for i, m in enumerate(mods)]
    else:
        paths = [write_kohya(tmp_path / f"a{i}.safetensors", m, alpha=3.0) for i, m in enumerate(mods)]
    adapters = [load_adapter(p) for p in paths]
    for name in adapters[0].modules:
        plain = [a.factors(name) for a in adapters]
        P = sum(f.rank for f in plain)
        A, B = torch.full((P, plain[0].A.shape[1]), float("nan")), torch.full((plain[0].B.shape[0], P), float("nan"))
        row = 0
        for a, f in zip(adapters, plain):
            got = a.factors(name, out=(A[row:row + f.rank], B[:, row:row + f.rank]))
            assert got.A.data_ptr() == A[row].data_ptr() and got.scale == f.scale
            row += f.rank
        assert torch.equal(A, torch.cat([f.A for f in plain])) and torch.equal(B, torch.cat([f.B for f in plain], 1))


def test_bad_values_in_any_input_are_refused_naming_that_input_when_read_stacked(tmp_path):
    # the stacked read checks a module in one pass; on NaN, Inf or a value too large it reads each input
    # again with every check, so that the error names the input and what is wrong
    good = random_adapter(tmp_path / "good", seed=0)
    cases = {"nan": (float("nan"), "lora_A contains NaN"), "inf": (float("inf"), "lora_A contains Inf"),
             "large": (1e20, "beyond the 1e+12")}
    for tag, (value, message) in cases.items():
        mods = random_modules(4, 1)
        mods["model.layers.0.self_attn.v_proj"][0][1, 2] = value
        bad = write_peft(tmp_path / tag, mods, r=4, alpha=8)
        with pytest.raises(LoraLegoError, match=rf"/{tag}(/adapter_model.safetensors)?: module model.layers.0.self_attn.v_proj: .*{re.escape(message)}"):
            merge([load_adapter(good), load_adapter(bad)], rank=2)
    # one pass over the stack bounds the largest value by the largest weight, which no input reaches here
    # (1e10 at weight 1, values below 10 at weight 1e3): the per-input check lets the merge go on
    mods = random_modules(4, 1)
    mods["model.layers.0.self_attn.v_proj"][0][1, 2] = 1e10
    large = load_adapter(write_peft(tmp_path / "1e10", mods, r=4, alpha=4))
    merged = merge([large, load_adapter(good)], rank=2, weights=[1.0, 1e3])
    assert set(merged.modules) == set(large.modules)


def test_linear_with_its_qr_prepared_in_the_reader_thread_is_truncate_sum(tmp_path):
    # linear's prepare (the stacked A and the QR of its transpose, in the reader thread) changes nothing:
    # the merged factors are bit for bit lowrank.truncate_sum of the module's factors
    from lora_lego.lowrank import truncate_sum
    from lora_lego.methods.linear import linear, stacked_a_qr

    adapters = [load_adapter(random_adapter(tmp_path / f"a{i}", rank=4, seed=i)) for i in range(3)]
    merged = merge(adapters, method="linear", rank=3)
    for name in adapters[0].modules:
        factors = [a.factors(name) for a in adapters]
        want = truncate_sum(factors, [1 / 3] * 3, 3)
        for got in (merged.factors(name), linear(factors, [1 / 3] * 3, 3, prepared=stacked_a_qr(factors))):
            assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
