"""Fuzzing the readers: corrupted safetensors bytes and headers, corrupted adapter_config.json, corrupted
legacy .bin files. Whatever the input, reading an adapter (and merging and writing what was read) either
works or raises LoraLegoError: no other exception, and no hang (each example has a hard time limit)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
from helpers import PREFIX, random_modules, write_peft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_lego import load_adapter, merge, save_adapter
from lora_lego.errors import LoraLegoError
from lora_lego.formats.tensors import read_safetensors_header

# LORA_LEGO_FUZZ_EXAMPLES=5000 for a longer campaign; the suite keeps it short
FUZZ = settings(max_examples=int(os.environ.get("LORA_LEGO_FUZZ_EXAMPLES", 120)), deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HARD_LIMIT_S = 30  # an example still running after this is a hang


class Hang(BaseException):  # not an Exception, so no `except Exception` in the code swallows it
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_everything(path: Path, out: Path | None = None) -> None:
    """What the CLI does with an input: read the config and header, every module's factors, merge, write."""
    with time_limit(HARD_LIMIT_S):
        try:
            adapter = load_adapter(path)
            for name in adapter.modules:
                f = adapter.factors(name)
                assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
            if out is not None:  # lego at rank 1, so that k-means really runs on what was read
                save_adapter(merge([adapter, adapter], rank=1, n_init=2), out)
        except LoraLegoError as e:
            assert "\n" not in str(e) and str(e)  # one line, never empty


SHAPES = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.mlp.down_proj": (4, 6)}


def valid_adapter(path: Path, dtype=torch.float32, **config) -> Path:
    return write_peft(path, random_modules(2, 0, shapes=SHAPES), r=2, alpha=4, dtype=dtype, **config)


@contextlib.contextmanager
def workdir():
    d = Path(tempfile.mkdtemp(prefix="lora-lego-fuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- safetensors: raw byte damage ------------------------------------------------------------------------

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
)


def mutate(raw: bytes, ops) -> bytes:
    buf = bytearray(raw)
    for op in ops:
        pos = op[1] % (len(buf) + 1)
        if op[0] == "flip" and pos < len(buf):
            buf[pos] ^= op[2]
        elif op[0] == "truncate":
            del buf[pos:]
        elif op[0] == "insert":
            buf[pos:pos] = op[2]
        elif op[0] == "overwrite":
            buf[pos:pos + len(op[2])] = op[2]
    return bytes(buf)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4), in_header=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_damaged_safetensors_bytes(ops, in_header, dtype):
    with workdir() as d:
        a = valid_adapter(d / "a", dtype=dtype)
        w = a / "adapter_model.safetensors"
        raw = w.read_bytes()
        if in_header:  # aim at the 8-byte length and the JSON header, where most of the structure is
            n = struct.unpack("<Q", raw[:8])[0]
            ops = [(op[0], op[1] % (8 + n), *op[2:]) for op in ops]
        w.write_bytes(mutate(raw, ops))
        read_everything(a, d / "out")


# --- safetensors: well-formed JSON with wrong contents --------------------------------------------------

KEYS = [f"{PREFIX}{m}.lora_{ab}.weight" for m in SHAPES for ab in "AB"] + ["x", "__metadata__"]
small_int = st.one_of(st.integers(-2, 8), st.just(2**63), st.just(2**64 + 1))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=True),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
tensor_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E4M3", "Q4", 3]),
    "shape": st.one_of(st.lists(small_int, max_size=5), json_value),
    "data_offsets": st.one_of(st.lists(small_int.map(abs), min_size=2, max_size=2), st.lists(small_int, max_size=3),
                              json_value),
})


@FUZZ
@given(header=st.dictionaries(st.sampled_from(KEYS), st.one_of(tensor_entry, json_value), max_size=5),
       data=st.binary(max_size=300), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -9]),
       config=st.sampled_from([{}, {"rank_pattern": {"down_proj": 4}}]))
def test_wrong_safetensors_headers(header, data, length_delta, config):
    with workdir() as d:
        a = valid_adapter(d / "a", **config)
        raw = json.dumps(header).encode()
        (a / "adapter_model.safetensors").write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)
        read_everything(a, d / "out")
        with time_limit(HARD_LIMIT_S):
            try:
                read_safetensors_header(a / "adapter_model.safetensors")
            except LoraLegoError:
                pass


def test_deeply_nested_header_and_config():
    """JSON nested deeper than Python's recursion limit: json raises RecursionError, which must not escape."""
    with workdir() as d:
        a = valid_adapter(d / "a")
        deep = b"[" * 100_000 + b"]" * 100_000
        (a / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
        try:
            load_adapter(a)
        except LoraLegoError as e:
            assert "not a valid safetensors file" in str(e)
        b = valid_adapter(d / "b")
        (b / "adapter_config.json").write_bytes(b'{"r": ' + deep + b"}")
        try:
            load_adapter(b)
        except LoraLegoError as e:
            assert "invalid JSON" in str(e)


# --- adapter_config.json -------------------------------------------------------------------------------

CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
               "target_modules", "fan_in_fan_out", "base_model_name_or_path", "layers_to_transform", "task_type",
               "modules_to_save", "exclude_modules", "revision"]
number = st.one_of(st.integers(-3, 9), st.sampled_from([2, 2.0, 2.5, 1e-300, 1e300, 2**70, float("nan"), float("inf"),
                                                       -float("inf"), True, "2"]), st.floats(allow_nan=True))
pattern_dict = st.dictionaries(st.one_of(st.sampled_from(["q_proj", "down_proj", "layers.0.mlp.down_proj", ".*",
                                                          "(?i)q_proj", "q(", "\\", "[", "a{99999999999}"]),
                                         st.text(max_size=6)),
                               st.one_of(number, number, json_value), max_size=3)
config_value = st.one_of(number, number, pattern_dict, pattern_dict, json_value,
                         st.lists(st.one_of(st.sampled_from(["q_proj", "down_proj"]), json_scalar), max_size=3),
                         st.sampled_from(["LORA", "LOHA", "lora", "q_proj", "all-linear"]))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), config_value, max_size=5),
       drop=st.lists(st.sampled_from(["r", "lora_alpha", "peft_type", "target_modules"]), max_size=2))
def test_wrong_config_values(changes, drop):
    with workdir() as d:
        a = valid_adapter(d / "a")
        cfg = json.loads((a / "adapter_config.json").read_text())
        for k in drop:
            cfg.pop(k, None)
        cfg.update(changes)
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        read_everything(a, d / "out")


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=3), whole=st.one_of(st.none(), json_value))
def test_damaged_config_text(ops, whole):
    with workdir() as d:
        a = valid_adapter(d / "a")
        c = a / "adapter_config.json"
        c.write_bytes(json.dumps(whole).encode() if whole is not None else mutate(c.read_bytes(), ops))
        read_everything(a, d / "out")


# --- legacy adapter_model.bin ----------------------------------------------------------------------------

def _bin_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    state = {f"{PREFIX}{m}.lora_A.weight": torch.randn(2, d_in, generator=g) for m, (_, d_in) in SHAPES.items()}
    state.update({f"{PREFIX}{m}.lora_B.weight": torch.randn(d_out, 2, generator=g) for m, (d_out, _) in SHAPES.items()})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


BIN = _bin_bytes()


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_bin(ops):
    with workdir() as d:
        a = valid_adapter(d / "a")
        (a / "adapter_model.safetensors").unlink()
        (a / "adapter_model.bin").write_bytes(mutate(BIN, ops))
        read_everything(a, d / "out")


def test_bin_with_non_tensor_or_non_string_keys():
    with workdir() as d:
        for state in ({1: torch.ones(2, 2)}, {"a": [1, 2]}, [torch.ones(2)]):
            a = valid_adapter(d / "a")
            (a / "adapter_model.safetensors").unlink()
            torch.save(state, a / "adapter_model.bin")
            try:
                load_adapter(a)
                raise AssertionError("accepted")
            except LoraLegoError as e:
                assert "adapter_model.bin" in str(e)
            shutil.rmtree(a)
