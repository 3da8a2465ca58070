"""lego's Gram products computed while the CLI imports torch.

`lora-lego merge` spends about a second importing torch before it can read anything; lego's costliest
step, the two Gram products of every module's stacked factors (msu.stacked_grams), needs only numpy.
So the CLI forks a child process before that import (``start_for_cli``, called first thing by
``lora_lego/__init__``); the child reads the PEFT inputs' factors and writes each module's G_A = A Aᵀ,
G_B = Bᵀ B and row signs into shared memory, bit for bit what ``stacked_grams`` computes (the same
float32 values in the same layout through the same numpy product), and the merge's reader thread takes
them (``GramPrefetch.take``) instead of multiplying again. A process, not a thread: a thread would
share the GIL with the import, which runs Python code most of the time.

Best effort by design: the child parses only what it needs and gives up silently on anything unusual
(other formats, dtypes, conv or embedding modules, a module some inputs lack); the merge then reads,
checks and multiplies as always, and every error message still comes from the normal readers. Only
Linux (fork with a parent-death signal). ``LORA_LEGO_PREFETCH=0`` turns it off. Torch is never imported
here, and nothing outside the standard library and numpy.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import signal
import struct
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .peft_rules import CONFIG_NAME, LINEAR_A_SUFFIX, LINEAR_B_SUFFIX, PREFIX, SAFETENSORS_NAME, lora_scale, \
    module_rank_alpha

# Shared memory for the Grams, at most: the modules beyond it are multiplied by the merge as usual. The
# 8 x Llama-2-7B rank-16 set needs 58 MB (224 modules of 2 x 128² float64).
BUDGET_BYTES = 256 * 2**20
_READ_DTYPES = ("F16", "BF16", "F32")
_PAGE_ITEMS = mmap.PAGESIZE // 8


@dataclass(frozen=True)
class PlannedModule:
    """One module present in every input, with what its stacked factors are made of."""

    name: str
    ranks: tuple[int, ...]
    d_in: int
    d_out: int
    scales: tuple[float, ...]  # each input's lora_alpha / r (or / sqrt(r)), as the PEFT reader computes it
    a: tuple[tuple[int, str], ...]  # each input's lora_A: (byte offset in its file, safetensors dtype)
    b: tuple[tuple[int, str], ...]
    slot: int  # offset of its (G_A, G_B, sign) in the shared memory, in float64 items

    @property
    def pool(self) -> int:
        return sum(self.ranks)

    @property
    def items(self) -> int:
        return 2 * self.pool * self.pool + self.pool

    def slot_views(self, results: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Its G_A (P x P), G_B (P x P) and row signs (P) in the shared results, where the child writes them
        and the parent reads them."""
        P = self.pool
        slot = results[self.slot:self.slot + self.items]
        return slot[:P * P].reshape(P, P), slot[P * P:2 * P * P].reshape(P, P), slot[2 * P * P:]


def _header(path: str) -> tuple[int, dict]:
    """(offset of the data section, the header's tensors) of a safetensors file; trusted only as far as the
    checks here go (the merge's own reader validates it fully)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def plan_modules(dirs: Sequence[str], budget: int = BUDGET_BYTES) -> list[PlannedModule]:
    """The modules whose Grams the child computes, in the merge's order (the first input's), as many as
    ``budget`` bytes of results hold. Raises on anything unexpected (the caller gives up)."""
    inputs = []
    for d in dirs:
        with open(os.path.join(d, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        start, header = _header(os.path.join(d, SAFETENSORS_NAME))
        inputs.append((config, start, header))
    names: dict[str, None] = {}
    for key in inputs[0][2]:
        for suffix in (LINEAR_A_SUFFIX, LINEAR_B_SUFFIX):
            if key.endswith(suffix):
                name = key[:-len(suffix)]
                names[name[len(PREFIX):] if name.startswith(PREFIX) else name] = None
    plan, used = [], 0
    for name in names:
        ranks, scales, a, b, dims = [], [], [], [], set()
        for config, start, header in inputs:
            ea, eb = header.get(PREFIX + name + LINEAR_A_SUFFIX), header.get(PREFIX + name + LINEAR_B_SUFFIX)
            if ea is None or eb is None:
                ea, eb = header.get(name + LINEAR_A_SUFFIX), header.get(name + LINEAR_B_SUFFIX)
            if ea is None or eb is None or ea["dtype"] not in _READ_DTYPES or eb["dtype"] not in _READ_DTYPES \
                    or len(ea["shape"]) != 2 or len(eb["shape"]) != 2:  # conv LoRAs are left to the merge
                break
            (r, d_in), (d_out, r_b) = ea["shape"], eb["shape"]
            r_cfg, alpha = module_rank_alpha(config, name)
            if r != r_b or r != r_cfg or min(r, d_in, d_out) < 1:
                break
            ranks.append(r)
            scales.append(lora_scale(alpha, r, bool(config.get("use_rslora", False))))
            a.append((start + ea["data_offsets"][0], ea["dtype"]))
            b.append((start + eb["data_offsets"][0], eb["dtype"]))
            dims.add((d_in, d_out))
        else:
            if len(dims) != 1:
                continue
            (d_in, d_out), = dims
            module = PlannedModule(name, tuple(ranks), d_in, d_out, tuple(scales), tuple(a), tuple(b), used)
            if 8 * (used + module.items) > budget:
                break
            plan.append(module)
            used += -(-module.items // _PAGE_ITEMS) * _PAGE_ITEMS  # whole pages: a slot is freed once used
    return plan


def _to_float32(raw: np.ndarray, dtype: str, out: np.ndarray, work: np.ndarray) -> None:
    """``raw`` (the file's bytes) as float32 into ``out``, exactly (every F16 and BF16 value is a float32).
    numpy's own float16 cast is ~14x slower than torch's on x86; the bit pattern is rebuilt instead:
    F16's exponent and mantissa shifted into float32's place, with the sign bit, read as a float32 that is
    2^-112 times the value (subnormals included), times 2^112 (exact: a power of two)."""
    if dtype == "F32":
        np.copyto(out, raw.view(np.float32).reshape(out.shape))
        return
    half = raw.view(np.uint16).reshape(out.shape)
    bits = work[:half.size].reshape(out.shape)
    if dtype == "BF16":
        np.left_shift(half, 16, out=bits, dtype=np.uint32)
        np.copyto(out, bits.view(np.float32))
        return
    np.bitwise_and(half, 0x7FFF, out=bits, dtype=np.uint32)
    np.left_shift(bits, 13, out=bits)
    sign = np.bitwise_and(half, 0x8000).astype(np.uint32)
    np.left_shift(sign, 16, out=sign)
    np.bitwise_or(bits, sign, out=bits)
    np.multiply(bits.view(np.float32), np.float32(2.0 ** 112), out=out)


def _conversion_exact() -> bool:
    """F16 conversion against numpy's own on subnormals, normals, signed zeros and the extremes: false where
    the CPU flushes subnormals (then the child does nothing)."""
    bits = np.array([0, 1, 2, 0x3FF, 0x400, 0x3C00, 0x7BFF, 0x8001, 0x8000, 0xBC00, 0x03FF, 0x0155], np.uint16)
    out = np.empty(bits.size, np.float32)
    _to_float32(bits.view(np.uint8), "F16", out, np.empty(bits.size, np.uint32))
    return bool(np.array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32)))


def sign_of_largest(A: np.ndarray) -> np.ndarray:
    """msu.sign_of_largest in numpy: the sign (+1 for 0) of each row's largest-magnitude entry, the first
    one where +m and -m both occur."""
    lo, hi = A.min(axis=1), A.max(axis=1)
    sign = np.where(hi >= -lo, 1.0, -1.0)
    tied = (hi == -lo) & (hi != 0)
    for row in np.flatnonzero(tied):
        sign[row] = -1.0 if A[row, np.argmax(np.abs(A[row]))] < 0 else 1.0
    return sign


def compute(dirs: Sequence[str], plan: Sequence[PlannedModule], results: np.ndarray, done_fd: int | None = None) -> None:
    """For each planned module in order: read every input's factors into the stacked float32 A (P x d_in)
    and B (d_out x P, input j's scale multiplied in float32), as the merge's reader does, and write
    G_A, G_B (float64 of the float32 products) and the row signs of A into ``results`` at the module's slot;
    one byte on ``done_fd`` after each."""
    fds = [os.open(os.path.join(d, SAFETENSORS_NAME), os.O_RDONLY) for d in dirs]
    largest = max((m.pool * max(m.d_in, m.d_out) for m in plan), default=0)
    raw = np.empty(4 * largest, np.uint8)
    work = np.empty(largest, np.uint32)
    stack_a, stack_b = np.empty(largest, np.float32), np.empty(largest, np.float32)
    for m in plan:
        P = m.pool
        A = stack_a[:P * m.d_in].reshape(P, m.d_in)
        B = stack_b[:m.d_out * P].reshape(m.d_out, P)
        row = 0
        for fd, r, scale, (off_a, dt_a), (off_b, dt_b) in zip(fds, m.ranks, m.scales, m.a, m.b):
            for offset, dtype, out in ((off_a, dt_a, A[row:row + r]), (off_b, dt_b, B[:, row:row + r])):
                n = out.size * (4 if dtype == "F32" else 2)
                if os.preadv(fd, [raw[:n]], offset) != n:
                    raise OSError("short read")
                _to_float32(raw[:n], dtype, out, work)
            np.multiply(B[:, row:row + r], np.float32(scale), out=B[:, row:row + r])
            row += r
        x = B.T  # the strides msu.gram64 sees for B.T of a C-ordered torch (d_out, P): the same BLAS call
        ga, gb, sign = m.slot_views(results)
        ga[...] = A @ A.T
        gb[...] = x @ x.T
        sign[...] = sign_of_largest(A)
        if done_fd is not None:
            os.write(done_fd, b"\x01")


class GramPrefetch:
    """The parent's side: which inputs and modules were planned, and the results as the child finishes them."""

    def __init__(self, dirs: list[str], plan: list[PlannedModule], memory: mmap.mmap, done_fd: int, pid: int):
        self.dirs = dirs
        self.plan = {m.name: (i, m) for i, m in enumerate(plan)}
        self._memory = memory
        self._results = np.frombuffer(memory, dtype=np.float64)
        self._done_fd = done_fd
        self._pid = pid
        self._done = 0
        self._ended = False
        self.taken = 0

    def matches(self, paths: Sequence[str]) -> bool:
        """Whether the merge's inputs are the ones planned for, in the same order."""
        return [os.path.realpath(p) for p in paths] == self.dirs

    def take(self, name: str, ranks: Sequence[int], d_in: int, d_out: int, scales: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(G_A, G_B, sign) of ``name`` as float64 copies, waiting for the child if it has not reached it yet;
        None where it was not planned, what the merge read differs from the plan, or the child stopped."""
        entry = self.plan.get(name)
        if entry is None:
            return None
        index, m = entry
        if (list(m.ranks), m.d_in, m.d_out, list(m.scales)) != (list(ranks), d_in, d_out, list(scales)):
            return None
        self._wait_for(index + 1)
        if self._done <= index:
            return None
        out = tuple(view.copy() for view in m.slot_views(self._results))
        if hasattr(mmap, "MADV_REMOVE"):  # give the slot's memory back (both processes'): it is read once
            try:
                self._memory.madvise(mmap.MADV_REMOVE, 8 * m.slot, 8 * m.items)
            except OSError:
                pass
        self.taken += 1
        return out

    def wait(self) -> int:
        """Wait for the child to finish; how many modules it computed."""
        self._wait_for(len(self.plan))
        return self._done

    def _wait_for(self, count: int) -> None:
        """Read the child's progress until it has computed ``count`` modules or ended."""
        while self._done < count and not self._ended and self._pid:
            got = os.read(self._done_fd, 65536)
            self._done += len(got)
            self._ended = not got  # the child exited (finished, gave up or was killed)

    def close(self) -> None:
        """Stop the child if it still runs and free everything (idempotent)."""
        global ACTIVE
        if self._pid and os.environ.get("LORA_LEGO_PREFETCH_STATS"):  # a diagnostic for benchmarks and tests
            print(f"lora-lego prefetch: {len(self.plan)} modules planned, {self._done} computed, {self.taken} used",
                  file=sys.stderr)
        if self._pid:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
            self._pid = 0
            os.close(self._done_fd)
            del self._results
            self._memory.close()
        if ACTIVE is self:
            ACTIVE = None


ACTIVE: GramPrefetch | None = None  # the CLI's, once started


def cli_arguments() -> list[str] | None:
    """The arguments after `lora-lego` where this process is the lora-lego command (the installed script or
    ``python -m lora_lego.cli``), else None."""
    orig = list(getattr(sys, "orig_argv", []))
    for i, token in enumerate(orig[:-1]):
        if token == "-m":
            return orig[i + 2:] if orig[i + 1] == "lora_lego.cli" else None
    if os.path.basename(sys.argv[0] if sys.argv else "") == "lora-lego":
        return sys.argv[1:]
    return None


def lego_inputs(args: Sequence[str]) -> list[str] | None:
    """The PEFT folders of a `merge` or `prune` that runs lego on the CPU, else None. A rough reading of the
    command line (the real parser needs torch): the merge checks that its inputs are these."""
    if not args or args[0] not in ("merge", "prune"):
        return None
    inputs, previous = [], ""
    for token in args[1:]:
        key, _, value = token.partition("=")
        if token in ("-h", "--help") or key == "--config":
            return None
        if (previous == "--method" or key == "--method" and value) and (value or token) != "lego":
            return None
        if (previous == "--device" or key == "--device" and value) and (value or token) != "cpu":
            return None
        if not token.startswith("-") and previous not in ("-o", "--output", "--method", "--device") \
                and os.path.isfile(os.path.join(token, CONFIG_NAME)) and os.path.isfile(os.path.join(token, SAFETENSORS_NAME)):
            inputs.append(os.path.realpath(token))
        previous = token
    return inputs or None


def start_for_cli() -> None:
    """Start the child where this process is a lego merge of PEFT folders on the CPU (see the module's
    docstring); anything else, or any failure, leaves ``ACTIVE`` None and the merge works as without."""
    global ACTIVE
    if ACTIVE is not None or os.environ.get("LORA_LEGO_PREFETCH", "1") == "0" or not sys.platform.startswith("linux"):
        return
    args = cli_arguments()
    dirs = lego_inputs(args) if args is not None else None
    if dirs:
        ACTIVE = start(dirs)
        if ACTIVE is not None:
            atexit.register(ACTIVE.close)


def start(dirs: Sequence[str], budget: int = BUDGET_BYTES) -> GramPrefetch | None:
    """Fork the child that computes the Grams of the PEFT folders ``dirs`` (None where there is nothing
    to do or the plan fails). Before torch is imported, as the CLI does, or at least before any other
    thread is started: a fork copies only the calling thread."""
    dirs = [os.path.realpath(d) for d in dirs]
    try:
        plan = plan_modules(dirs, budget)
    except Exception:
        return None
    if not plan or not _conversion_exact():
        return None
    parent = os.getpid()
    try:
        memory = mmap.mmap(-1, 8 * (plan[-1].slot + plan[-1].items))
        done_r, done_w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:  # no more processes or memory: the merge works as without
        for fd in (done_r, done_w):
            os.close(fd)
        memory.close()
        return None
    if pid == 0:  # the child: compute, never return into the caller's code
        code = 0
        try:
            os.close(done_r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
            _die_with_parent(parent)
            compute(dirs, plan, np.frombuffer(memory, dtype=np.float64), done_w)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(done_w)
    return GramPrefetch(dirs, plan, memory, done_r, pid)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies (Linux's prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(0)
