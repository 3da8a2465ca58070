import os

import pytest
from helpers import random_adapter

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.errors import LoraLegoError
from lora_lego.output import PARTIAL_TAG, atomic_output, check_output_path


def test_failure_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_stale_partial_from_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / f".out{PARTIAL_TAG}999999"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_text("half")
    ad = merge([load_adapter(random_adapter(tmp_path / "a"))])
    save_adapter(ad, tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "adapter_config.json").exists()


def test_force_replaces_whole_and_without_force_refuses(tmp_path):
    ad = merge([load_adapter(random_adapter(tmp_path / "a"))])
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("an earlier output")
    (out / "old.txt").write_text("old")
    with pytest.raises(LoraLegoError, match="pass --force"):
        save_adapter(ad, out)
    assert (out / "old.txt").exists()
    save_adapter(ad, out, force=True)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


def test_empty_output_folder_is_accepted(tmp_path):
    ad = merge([load_adapter(random_adapter(tmp_path / "a"))])
    (tmp_path / "out").mkdir()
    save_adapter(ad, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_output_may_not_be_or_touch_an_input(tmp_path):
    a = random_adapter(tmp_path / "a")
    for target in (a, a / "sub", tmp_path):
        with pytest.raises(LoraLegoError, match="inputs are never written"):
            check_output_path(target, [a], force=True)
    ad = load_adapter(a)
    with pytest.raises(LoraLegoError, match="inputs are never written"):
        save_adapter(ad, a, force=True)  # the adapter's own source counts as an input


def test_a_short_write_is_caught_before_the_rename(tmp_path):
    """Verification re-reads what was written: a safetensors file whose data stops short of its header (a
    lost write) or a JSON file that does not parse never reaches the target, in a folder or as one file."""
    from lora_lego.formats.tensors import write_safetensors
    import torch

    for directory, name in ((True, "out"), (False, "one.safetensors")):
        target = tmp_path / name
        with pytest.raises(LoraLegoError, match="failed verification"):
            with atomic_output(target, directory=directory) as tmp:
                f = tmp / "adapter_model.safetensors" if directory else tmp
                write_safetensors(f, {"x": torch.ones(4, 4)})
                f.write_bytes(f.read_bytes()[:-3])
        assert not target.exists() and os.listdir(tmp_path) == []
    with pytest.raises(LoraLegoError, match="adapter_config.json failed verification"):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "adapter_config.json").write_text('{"r": 4')
    assert os.listdir(tmp_path) == []
    with atomic_output(tmp_path / "fine.safetensors", directory=False) as tmp:
        write_safetensors(tmp, {"x": torch.ones(4, 4)})
    assert (tmp_path / "fine.safetensors").is_file()
