"""Every refusal the CLI makes, end to end: exit 2, exactly one line on stderr that names the file and module
where one is involved, no traceback, nothing written beside the inputs, and the inputs byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PREFIX, random_adapter, random_modules, write_peft
from safetensors import safe_open
from safetensors.torch import save_file

from lora_lego import load_adapter
from lora_lego.cli import main
from lora_lego.output import PARTIAL_TAG

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.1.mlp.down_proj"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` and the names of every folder: equal before and after means
    nothing was written, renamed or left behind."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def run_main(capsys, args: list[str]) -> tuple[int, list[str]]:
    """The CLI in this process: any exception other than our one-line error propagates and fails the test."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_refused(capsys, tmp_path: Path, args: list, *needles: str) -> str:
    before = tree_hashes(tmp_path)
    rc, lines = run_main(capsys, args)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("lora-lego: error: ") and "Traceback" not in line
    for needle in needles:
        assert needle in line, (needle, line)
    assert tree_hashes(tmp_path) == before  # inputs untouched, no output, no partial
    return line


# --- building bad inputs -------------------------------------------------------------------------------

def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def truncate_data(a: Path) -> Path:
    w = a / WEIGHTS
    w.write_bytes(w.read_bytes()[:-10])
    return w


def truncate_header(a: Path) -> Path:
    w = a / WEIGHTS
    w.write_bytes(w.read_bytes()[: 8 + _header_len(w) // 2])
    return w


def truncate_to_4_bytes(a: Path) -> Path:
    w = a / WEIGHTS
    w.write_bytes(w.read_bytes()[:4])
    return w


def garbage_header(a: Path) -> Path:
    w = a / WEIGHTS
    raw = bytearray(w.read_bytes())
    raw[8:20] = b"\xff" * 12
    w.write_bytes(bytes(raw))
    return w


def huge_header_length(a: Path) -> Path:
    w = a / WEIGHTS
    w.write_bytes(struct.pack("<Q", 2**60) + w.read_bytes()[8:])
    return w


def trailing_bytes(a: Path) -> Path:
    w = a / WEIGHTS
    w.write_bytes(w.read_bytes() + b"\0" * 16)
    return w


def shifted_offsets(a: Path) -> Path:
    """A header whose first tensor's range overlaps the next one."""
    w = a / WEIGHTS
    raw = w.read_bytes()
    n = _header_len(w)
    header = json.loads(raw[8:8 + n])
    key = sorted(k for k in header if k != "__metadata__")[1]
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start - 4, end - 4]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    w.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return w


def edit_config(**changes):
    def edit(a: Path) -> Path:
        cfg = json.loads((a / CONFIG).read_text())
        cfg.update(changes)
        (a / CONFIG).write_text(json.dumps(cfg))  # NaN is written as NaN, which Python's reader accepts
        return a / CONFIG
    return edit


def config_rank_mismatch(a: Path) -> Path:
    edit_config(r=8)(a)
    return a / WEIGHTS  # the tensors disagree with the config: named by the file that holds them


def raw_config(text: str):
    def edit(a: Path) -> Path:
        (a / CONFIG).write_text(text)
        return a / CONFIG
    return edit


def add_tensor(key: str, shape=(4,)):
    def edit(a: Path) -> Path:
        w = a / WEIGHTS
        with safe_open(str(w), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[key] = torch.ones(shape)
        save_file(tensors, str(w))
        return w
    return edit


def remove_file(name: str):
    def edit(a: Path) -> Path:
        (a / name).unlink()
        return a
    return edit


BAD_INPUTS = {
    # id: (how to spoil adapter a, what the message must say, module named or None)
    "truncated-data": (truncate_data, "truncated or corrupt", None),
    "truncated-header": (truncate_header, "truncated or corrupt", None),
    "truncated-to-4-bytes": (truncate_to_4_bytes, "not a safetensors file", None),
    "garbage-header": (garbage_header, "not a valid safetensors file", None),
    "huge-header-length": (huge_header_length, "exceeds the file size", None),
    "trailing-bytes": (trailing_bytes, "truncated or corrupt", None),
    "overlapping-offsets": (shifted_offsets, "is corrupt", None),
    "config-not-json": (raw_config("{r: 4,"), "invalid JSON", None),
    "config-not-object": (raw_config("[4]"), "expected a JSON object", None),
    "config-r-zero": (edit_config(r=0), "r must be a whole number >= 1", None),
    "config-r-string": (edit_config(r="4"), "r must be a whole number >= 1", None),
    "config-r-fraction": (edit_config(r=4.5), "r must be a whole number >= 1", None),
    "config-alpha-nan": (edit_config(lora_alpha=float("nan")), "lora_alpha must be a finite number > 0", None),
    "config-alpha-inf": (edit_config(lora_alpha=float("inf")), "lora_alpha must be a finite number > 0", None),
    "config-rank-pattern-list": (edit_config(rank_pattern=[4]), "rank_pattern must be an object", None),
    "config-bad-pattern": (edit_config(rank_pattern={"q_proj(": 4}), "is not a valid pattern", None),
    "config-flag-pattern": (edit_config(alpha_pattern={"(?i)q_proj": 4}), "is not a valid pattern", None),
    "config-target-number": (edit_config(target_modules=5), "target_modules must be", None),
    "config-r-mismatch": (config_rank_mismatch, "adapter_config.json gives r=8", Q),
    "config-missing": (remove_file(CONFIG), "folder holds no adapter", None),
    "weights-missing": (remove_file(WEIGHTS), "neither adapter_model.safetensors nor adapter_model.bin", None),
    "dora-config": (edit_config(use_dora=True), "DoRA", None),
    "dora-tensor": (add_tensor(f"{PREFIX}{Q}.lora_magnitude_vector"), "DoRA", Q),
    "loha-config": (edit_config(peft_type="LOHA"), "peft_type is LOHA", None),
    "loha-tensor": (add_tensor(f"{PREFIX}{Q}.hada_w1_a", (4, 16)), "LoHa", Q),
    "lokr-config": (edit_config(peft_type="LOKR"), "peft_type is LOKR", None),
    "lokr-tensor": (add_tensor(f"{PREFIX}{Q}.lokr_w1", (4, 4)), "LoKr", Q),
    "lora-bias": (add_tensor(f"{PREFIX}{Q}.lora_B.bias", (24,)), "LoRA bias", Q),
    "modules-to-save": (add_tensor(f"{PREFIX}lm_head.weight", (8, 8)), "not LoRA factors", None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, case):
    spoil, message, module = BAD_INPUTS[case]
    a = random_adapter(tmp_path / "a", seed=0)
    b = random_adapter(tmp_path / "b", seed=1)
    named = spoil(a)
    needles = [str(named), message] + ([f"module {module}"] if module else [])
    assert_refused(capsys, tmp_path, ["merge", b, a, "-o", tmp_path / "out"], *needles)


def test_missing_path_and_empty_folder(tmp_path, capsys):
    a = random_adapter(tmp_path / "a")
    assert_refused(capsys, tmp_path, ["merge", a, tmp_path / "nope", "-o", tmp_path / "out"],
                   str(tmp_path / "nope"), "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert_refused(capsys, tmp_path, ["merge", a, tmp_path / "empty", "-o", tmp_path / "out"],
                   str(tmp_path / "empty"), "holds no adapter")
    loose = tmp_path / "loose.safetensors"
    shutil.copy(a / WEIGHTS, loose)
    assert_refused(capsys, tmp_path, ["merge", a, loose, "-o", tmp_path / "out"], str(loose))  # PEFT keys, no config


@pytest.mark.parametrize("where, value", [("A", float("nan")), ("B", float("inf")), ("B", float("-inf"))])
def test_nan_or_inf_in_a_tensor(tmp_path, capsys, where, value):
    mods = random_modules(4, 0)
    mods[V][0 if where == "A" else 1][1, 2] = value
    a = write_peft(tmp_path / "a", mods, r=4, alpha=8, dtype=torch.float16)
    b = random_adapter(tmp_path / "b", seed=1)
    bad = "NaN" if value != value else "Inf"
    assert_refused(capsys, tmp_path, ["merge", b, a, "-o", tmp_path / "out"],
                   str(a / WEIGHTS), f"module {V}", f"lora_{where} contains {bad}")


def test_same_module_with_different_shapes(tmp_path, capsys):
    a = random_adapter(tmp_path / "a", seed=0)
    shapes = {Q: (24, 32), V: (12, 16), DOWN: (16, 20)}  # q_proj of a wider base model
    b = write_peft(tmp_path / "b", random_modules(4, 1, shapes=shapes), r=4, alpha=8)
    assert_refused(capsys, tmp_path, ["merge", a, b, "-o", tmp_path / "out"],
                   str(b), f"module {Q}", "24x32", "24x16", "different base models")


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "--rank must be a whole number >= 1, got 0"),
    (["--rank", "-3"], "--rank must be a whole number >= 1, got -3"),
    (["--rank", "two"], "invalid int value"),
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--weights", "1"], "--weights has 1 value(s) for 2"),
    (["--weights", "1", "2", "3"], "--weights has 3 value(s) for 2"),
    (["--weights", "1", "nan"], "--weights must be finite"),
    (["--method", "concat", "--rank", "2"], "--rank does not apply to concat"),
    (["--method", "concat", "--canonicalize", "sign"], "does not apply to method concat"),
    (["--unit-split", "c"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_options(tmp_path, capsys, extra, message):
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    assert_refused(capsys, tmp_path, ["merge", a, b, "-o", tmp_path / "out", *extra], message)


def test_output_that_is_in_or_around_an_input(tmp_path, capsys):
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    for out in (a, b / "sub", b / WEIGHTS, tmp_path):
        assert_refused(capsys, tmp_path, ["merge", a, b, "-o", out, "--force"], str(out), "inputs are never written")
    os.symlink(b, tmp_path / "link-to-b")  # the same folder by another name
    assert_refused(capsys, tmp_path, ["merge", a, b, "-o", tmp_path / "link-to-b", "--force"], "inputs are never written")


def test_non_empty_output_without_force_is_kept(tmp_path, capsys):
    a = random_adapter(tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert_refused(capsys, tmp_path, ["merge", a, "-o", tmp_path / "out"], str(tmp_path / "out"), "pass --force")
    (tmp_path / "file-out").write_text("a file")
    assert_refused(capsys, tmp_path, ["prune", a, "--rank", "2", "-o", tmp_path / "file-out"], "pass --force")


def test_fp16_overflow_is_stored_as_float32_and_said(tmp_path, capsys):
    mods = {Q: (torch.full((1, 16), 0.5), torch.full((24, 1), 2000.0))}
    a = write_peft(tmp_path / "a", mods, r=1, alpha=64, dtype=torch.float16)  # B with its scale: 128000
    before = tree_hashes(a)
    rc, lines = run_main(capsys, ["merge", a, "-o", tmp_path / "out", "--method", "concat"])
    assert rc == 0, lines
    warning = [line for line in lines if "warning" in line]
    assert len(warning) == 1 and str(tmp_path / "out") in warning[0] and PARTIAL_TAG not in warning[0]
    assert "exceeds the float16 range" in warning[0] and "stored in float32 instead of float16" in warning[0]
    assert f"{Q}.lora_B.weight" in warning[0]
    assert "float32" in lines[-1]  # the summary says the stored dtype too
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="pt") as f:
        B = f.get_tensor(f"{PREFIX}{Q}.lora_B.weight")
    assert B.dtype == torch.float32 and torch.all(B == 128000.0)
    assert tree_hashes(a) == before


def test_fp16_without_overflow_stays_fp16(tmp_path, capsys):
    a = random_adapter(tmp_path / "a", dtype=torch.float16)
    rc, lines = run_main(capsys, ["merge", a, "-o", tmp_path / "out"])
    assert rc == 0 and not any("warning" in line for line in lines) and "float16" in lines[-1]
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


# --- partial module overlap ------------------------------------------------------------------------------

def test_partly_overlapping_and_disjoint_inputs_are_merged_and_reported(tmp_path, capsys):
    full = random_modules(4, 0)
    a = write_peft(tmp_path / "a", full, r=4, alpha=8)
    b = write_peft(tmp_path / "b", {Q: random_modules(4, 1)[Q]}, r=4, alpha=8)
    other = {"model.layers.2.self_attn.o_proj": (torch.randn(4, 16), torch.randn(16, 4))}
    c = write_peft(tmp_path / "c", other, r=4, alpha=8)
    before = {p: tree_hashes(p) for p in (a, b, c)}
    rc, lines = run_main(capsys, ["merge", a, b, c, "-o", tmp_path / "out", "--method", "concat"])
    assert rc == 0, lines
    note = [line for line in lines if "only some inputs" in line]
    assert len(note) == 1
    assert "4 of 4 modules" in note[0]  # with c, not even q_proj is in every input
    assert f"2 only in {a};" in note[0] and f"1 only in {a}, {b};" in note[0] and f"1 only in {c})" in note[0]
    assert "modules_from_some_inputs" in note[0]
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="pt") as f:
        provenance = json.loads(f.metadata()["lora_lego"])
    assert provenance["inputs"] == [str(a), str(b), str(c)]
    assert provenance["modules_from_some_inputs"] == {Q: [0, 1], V: [0], DOWN: [0], "model.layers.2.self_attn.o_proj": [2]}
    merged = load_adapter(tmp_path / "out")
    ins = [load_adapter(p) for p in (a, b, c)]
    assert torch.allclose(merged.factors(Q).delta(), ins[0].factors(Q).delta() + ins[1].factors(Q).delta(), atol=1e-5)
    assert torch.allclose(merged.factors(V).delta(), ins[0].factors(V).delta(), atol=1e-6)
    o = "model.layers.2.self_attn.o_proj"
    assert torch.allclose(merged.factors(o).delta(), ins[2].factors(o).delta(), atol=1e-6)
    assert {p: tree_hashes(p) for p in (a, b, c)} == before


def test_fully_shared_modules_get_no_note(tmp_path, capsys):
    a, b = random_adapter(tmp_path / "a", seed=0), random_adapter(tmp_path / "b", seed=1)
    rc, lines = run_main(capsys, ["merge", a, b, "-o", tmp_path / "out"])
    assert rc == 0 and not any("only some inputs" in line for line in lines)
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="pt") as f:
        assert "modules_from_some_inputs" not in json.loads(f.metadata()["lora_lego"])


# --- no space left: real write failures, in a subprocess ----------------------------------------------

def big_adapter(path: Path, seed: int) -> Path:
    """About 128 KB of factors, so that its merge does not fit in the small limits below."""
    shapes = {f"model.layers.{i}.self_attn.q_proj": (256, 256) for i in range(4)}
    return write_peft(path, random_modules(16, seed, shapes=shapes), r=16, alpha=16)


def _limit_file_size():
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_file_size_limit_while_writing(tmp_path):
    a, b = big_adapter(tmp_path / "a", 0), big_adapter(tmp_path / "b", 1)
    before = tree_hashes(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lora_lego.cli", "merge", str(a), str(b), "-o",
                           str(tmp_path / "new" / "out"), "--method", "concat"],
                          capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(tmp_path / "new" / "out") in lines[0] and "File too large" in lines[0] and "nothing was written" in lines[0]
    assert tree_hashes(tmp_path) == before  # no output, no partial, not even the parent folder it made


def test_no_space_left_on_a_full_filesystem(tmp_path):
    """A real 64 KB tmpfs in a private mount namespace (root, or an unprivileged user namespace)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run([unshare, *flags, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    a, b = big_adapter(tmp_path / "a", 0), big_adapter(tmp_path / "b", 1)
    before = tree_hashes(tmp_path)
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && "
              f"{sys.executable} -m lora_lego.cli merge {a} {b} -o {disk / 'out'} --method concat; "
              f"echo rc=$? >&2; ls -A {disk} >&2")
    proc = subprocess.run([unshare, *flags, "sh", "-c", script], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert lines[1:] == ["rc=2"], proc.stderr  # one error line, exit 2, and the tmpfs left empty
    assert str(disk / "out") in lines[0] and "No space left on device" in lines[0]
    assert "Traceback" not in proc.stderr
    assert tree_hashes(tmp_path) == before


def test_finite_but_absurdly_large_values_are_refused(tmp_path, capsys):
    """Finite values whose squares overflow float32 must not reach k-means (it would crash or emit NaN)."""
    mods = random_modules(4, 0)
    mods[V][1][0, 0] = 1e20
    a = write_peft(tmp_path / "a", mods, r=4, alpha=8)
    b = random_adapter(tmp_path / "b", seed=1)
    assert_refused(capsys, tmp_path, ["merge", b, a, "-o", tmp_path / "out"], str(a), f"module {V}", "beyond the 1e+12")
    huge_alpha = random_adapter(tmp_path / "c", alpha=1e30)
    assert_refused(capsys, tmp_path, ["merge", b, huge_alpha, "-o", tmp_path / "out"], str(huge_alpha), "module ")
    d = random_adapter(tmp_path / "d", seed=2)
    assert_refused(capsys, tmp_path, ["merge", b, d, "-o", tmp_path / "out", "--weights", "1", "1e30"], str(d), "module ")


def test_alpha_so_large_that_the_scaled_factor_overflows(tmp_path, capsys):
    a = random_adapter(tmp_path / "a", alpha=1e300)  # finite, but B * alpha / r is not, in float32
    assert_refused(capsys, tmp_path, ["merge", a, "-o", tmp_path / "out"], str(a / WEIGHTS), "module ",
                   "overflows float32")


def test_force_never_replaces_something_that_is_not_an_adapter(tmp_path, capsys):
    """A mistyped -o (a home folder, a project) must not be swapped away and deleted by --force."""
    a = random_adapter(tmp_path / "a")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.tex").write_text("years of work")
    assert_refused(capsys, tmp_path, ["merge", a, "-o", docs, "--force"], str(docs), "holds no adapter")
    (tmp_path / "notes.txt").write_text("keep")
    assert_refused(capsys, tmp_path, ["merge", a, "-o", tmp_path / "notes.txt", "--force"], "holds no adapter")
    # an earlier output is replaced whole
    rc, _ = run_main(capsys, ["merge", a, "-o", tmp_path / "out", "--rank", "2"])
    (tmp_path / "out" / "stale.txt").write_text("stale")
    rc2, _ = run_main(capsys, ["merge", a, "-o", tmp_path / "out", "--force"])
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert rc == rc2 == 0 and {CONFIG, WEIGHTS} <= written and "stale.txt" not in written


def test_output_under_a_file(tmp_path, capsys):
    a = random_adapter(tmp_path / "a")
    (tmp_path / "plain").write_text("x")
    assert_refused(capsys, tmp_path, ["merge", a, "-o", tmp_path / "plain" / "out"], "is not a folder")


def test_legacy_bin_input_is_read_and_left_byte_identical(tmp_path, capsys):
    a = random_adapter(tmp_path / "a")
    with safe_open(str(a / WEIGHTS), framework="pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, a / "adapter_model.bin")
    (a / WEIGHTS).unlink()
    before = tree_hashes(a)
    rc, lines = run_main(capsys, ["merge", a, a, "-o", tmp_path / "out", "--rank", "3"])
    assert rc == 0, lines
    assert tree_hashes(a) == before
