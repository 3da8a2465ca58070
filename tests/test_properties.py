"""The identities that make rank-wise merging sound, on random shapes, ranks, weights and options:
concatenation equals summation, permuting units changes nothing, a LoRA merged with rank-permuted copies of
itself is returned unchanged, and what is written is read back exactly."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.adapter import Adapter, Factors
from lora_lego.methods.concat import concat_factors
from lora_lego.lego_core import OUTPUT_REWEIGHTS, PARAM_REWEIGHTS, output_factor
from lora_lego.methods.lego import lego, target_norm
from lora_lego.msu import CANONICALIZATIONS, UNIT_SPLITS, factors_from_units, pool_units

PROPS = settings(max_examples=40, deadline=timedelta(seconds=20))

dim = st.integers(1, 12)
rank = st.integers(1, 6)
weight = st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


@st.composite
def lora_set(draw, n_min=1, n_max=4, dtype=torch.float64):
    """N LoRAs of one module: shared (d_out, d_in), each its own rank and scale."""
    n = draw(st.integers(n_min, n_max))
    d_in, d_out = draw(dim), draw(dim)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for _ in range(n):
        r = draw(rank)
        scale = draw(st.floats(0.1, 4))
        out.append(Factors(torch.randn(r, d_in, generator=g, dtype=dtype),
                           torch.randn(d_out, r, generator=g, dtype=dtype) * scale, scale))
    return out


def permuted(f: Factors, seed: int) -> Factors:
    p = torch.randperm(f.rank, generator=torch.Generator().manual_seed(seed))
    return Factors(f.A[p], f.B[:, p], f.scale)


def close(x: torch.Tensor, y: torch.Tensor, tol: float) -> bool:
    scale = max(float(x.abs().max()), float(y.abs().max()), 1.0)
    return bool((x - y).abs().max() <= tol * scale)


@PROPS
@given(fs=lora_set(), data=st.data())
def test_concatenation_equals_weighted_summation(fs, data):
    w = data.draw(st.lists(weight, min_size=len(fs), max_size=len(fs)))
    out = concat_factors(fs, w)
    assert out.rank == sum(f.rank for f in fs)
    assert close(out.delta(), sum(wi * f.delta() for wi, f in zip(w, fs)), 1e-12)


@PROPS
@given(fs=lora_set(), seed=st.integers(0, 10**6), split=st.sampled_from(UNIT_SPLITS),
       canon=st.sampled_from(CANONICALIZATIONS), data=st.data())
def test_pooled_units_reassemble_to_the_weighted_sum_in_any_order(fs, seed, split, canon, data):
    w = data.draw(st.lists(weight, min_size=len(fs), max_size=len(fs)))
    X, d_in = pool_units(fs, w, split, canon)
    expected = sum(wi * f.delta() for wi, f in zip(w, fs))
    assert close(factors_from_units(X, d_in).delta(), expected, 1e-10)
    p = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    assert close(factors_from_units(X[p], d_in).delta(), expected, 1e-10)
    # permuting the units inside each input, or the order of the inputs, gives the same sum
    shuffled = [permuted(f, seed + i) for i, f in enumerate(fs)][::-1]
    assert close(concat_factors(shuffled, w[::-1]).delta(), expected, 1e-10)


@PROPS
@given(fs=lora_set(dtype=torch.float32), seed=st.integers(0, 10**6), extra=st.integers(0, 3),
       pr=st.sampled_from(PARAM_REWEIGHTS), orw=st.sampled_from(OUTPUT_REWEIGHTS), data=st.data())
def test_lego_with_k_at_least_the_pool_is_the_exact_sum_times_the_output_factor(fs, seed, extra, pr, orw, data):
    w = data.draw(st.lists(weight, min_size=len(fs), max_size=len(fs)))
    pool = sum(f.rank for f in fs)
    k = pool + extra
    g = torch.Generator().manual_seed(seed)
    out = lego(fs, w, k, generator=g, param_reweight=pr, output_reweight=orw)
    mean_rank = pool / len(fs)
    total = sum(wi * f.delta() for wi, f in zip(w, fs))
    if orw.startswith("norm_"):  # the exact sum, scaled to the norm the rule computes from the inputs
        norm = float(total.norm())
        expected = total * (target_norm(fs, w, orw) / norm if norm > 0 else 0.0)
    else:
        expected = output_factor(mean_rank, pool, orw) * total
    assert out.rank == pool
    assert close(out.delta(), expected, 1e-4)
    # and the same for the units permuted and the inputs reordered, under another seed
    shuffled = [permuted(f, seed + i) for i, f in enumerate(fs)][::-1]
    again = lego(shuffled, w[::-1], k, generator=torch.Generator().manual_seed(seed + 1), param_reweight=pr,
                 output_reweight=orw)
    assert close(again.delta(), out.delta(), 1e-4)


@PROPS
@given(fs=lora_set(n_min=1, n_max=1, dtype=torch.float32), copies=st.integers(1, 4), seed=st.integers(0, 10**6),
       pr=st.sampled_from(PARAM_REWEIGHTS), split=st.sampled_from(UNIT_SPLITS), canon=st.sampled_from(CANONICALIZATIONS))
def test_self_merge_with_permuted_copies_returns_the_lora(fs, copies, seed, pr, split, canon):
    f = fs[0]
    inputs = [f] + [permuted(f, seed + i) for i in range(1, copies)]
    out = lego(inputs, [1.0] * copies, None, generator=torch.Generator().manual_seed(seed), param_reweight=pr,
               unit_split=split, canonicalize=canon)
    assert out.rank == f.rank
    assert close(out.delta(), f.delta(), 1e-4)


@settings(PROPS, max_examples=25)
@given(fs=lora_set(n_min=2, n_max=3, dtype=torch.float32), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                                  torch.bfloat16]))
def test_written_adapter_reads_back_as_what_was_merged(fs, dtype):
    """Through the files: merge with concat, save, load; the factors come back equal (in the stored dtype)."""
    adapters = [Adapter.from_factors({"model.layers.0.mlp.down_proj": f}, dtype=dtype) for f in fs]
    merged = merge(adapters, method="concat")
    with tempfile.TemporaryDirectory() as d:
        save_adapter(merged, Path(d) / "out")
        back = load_adapter(Path(d) / "out")
        name = "model.layers.0.mlp.down_proj"
        want, got = merged.factors(name), back.factors(name)
        assert back.modules[name].dtype == dtype
        assert torch.equal(got.A, want.A.to(dtype).float()) and torch.equal(got.B, want.B.to(dtype).float())
