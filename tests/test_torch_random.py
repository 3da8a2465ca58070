"""Bit-exact agreement of the torch-free ``torch_rand_float64`` with ``torch.rand`` (CPU, float64)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_lego.torch_random import module_seed, torch_rand_float64

MODULE = Path(__file__).resolve().parents[1] / "src" / "lora_lego" / "torch_random.py"
_RNG = random.Random(1234)
SEEDS = [0, 1, 2**31 - 1, 2**32, 2**32 + 5, 2**63 - 2] + [_RNG.randrange(2**63) for _ in range(50)]
SHAPES = [(640,), (10, 16, 4), (1,), (7,), (16,), (5000,), (2, 3)]


def _torch_rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).numpy()


def _assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64))


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_torch_bit_for_bit(seed: int) -> None:
    for shape in SHAPES:
        _assert_bits_equal(torch_rand_float64(seed, shape), _torch_rand(seed, shape))


@pytest.mark.parametrize("shape", [(), (0,), (311,), (312,), (313,), (624,), (625,)])
def test_edge_shapes(shape: tuple[int, ...]) -> None:
    for seed in (0, 42, 2**63 - 2):
        _assert_bits_equal(torch_rand_float64(seed, shape), _torch_rand(seed, shape))


def test_module_seeds_as_the_merge_seeds_each_module() -> None:
    for base in (0, 7, 2**40):
        for name in ("model.layers.0.self_attn.q_proj", "lm_head"):
            seed = module_seed(base, name)
            assert 0 <= seed < 2**63 - 1
            _assert_bits_equal(torch_rand_float64(seed, (640,)), _torch_rand(seed, (640,)))


def test_does_not_import_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('torch_random', {str(MODULE)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.torch_rand_float64(3, (4, 5))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(MODULE.parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
