"""The lazy tensor reader: plain reads of one tensor's byte range, no memory map."""

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lego.errors import LoraLegoError
from lora_lego.formats.tensors import TensorSource


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(7, 2, generator=g).half(),
        "c.bf16": torch.randn(4, generator=g).bfloat16(),
        "d.f64": torch.randn(2, 3, 1, 1, generator=g).double(),
        "e.i64": torch.arange(6).reshape(2, 3),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }


def test_reads_every_tensor_bit_exactly_as_safetensors_does(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(sample_tensors(), str(path), metadata={"format": "pt"})
    src = TensorSource.open(path)
    ref = load_file(str(path))
    assert sorted(src.keys()) == sorted(ref)
    for key, t in ref.items():
        got = src.get(key)
        assert got.dtype == t.dtype and got.shape == t.shape and src.shape(key) == tuple(t.shape)
        assert torch.equal(got, t)


def test_a_read_tensor_owns_its_memory_and_no_map_of_the_file_stays(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(sample_tensors(), str(path))
    src = TensorSource.open(path)
    t = src.get("a.f32")
    t += 1  # writable, detached from the file
    assert torch.equal(src.get("a.f32") + 1, t)
    if sys.platform.startswith("linux"):
        maps = open("/proc/self/maps").read()
        assert str(path.resolve()) not in maps


def test_file_truncated_after_opening_is_refused_with_its_name(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(sample_tensors(), str(path))
    src = TensorSource.open(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])
    last = max(src.keys(), key=lambda k: src._offsets[k][0])
    with pytest.raises(LoraLegoError, match="truncated") as e:
        src.get(last)
    assert "w.safetensors" in str(e.value)
