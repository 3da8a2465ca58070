"""lego computed while the CLI imports torch.

`lora-lego merge` spends about a second importing torch before it can read anything, and lego needs no
torch on the CPU: its two Gram products per module are numpy's, the clustering and the algebra between
them are numpy's (kmeans_core.py, lego_core.py), the random draws are torch's mt19937 stream, which
torch_random.py reproduces, and the centroid products are numpy's again. So the CLI forks two worker
processes before that import (``start_for_cli``, called first thing by ``lora_lego/__init__``); each
reads every other module's factors from the PEFT inputs, stacks them as the merge's reader does, and
writes into shared memory the module's G_A = A Aᵀ, G_B = Bᵀ B and row signs and, where it could read
the merge's settings from the command line (rank, weights, seed, lego's options), the merged factors
themselves: bit for bit what ``merge`` computes, by the same functions on the same float32 values. The
merge takes a module's merged factors (``GramPrefetch.take_merged``) when its settings are the ones the
workers assumed, else its Grams (``take``), and computes only what is missing. Processes, not threads:
a thread would share the GIL with the import, which runs Python code most of the time.

Best effort by design: the workers parse only what they need and give up silently on anything unusual
(other formats, dtypes, conv or embedding modules, a module some inputs lack, a value not finite or
beyond what the merge accepts); the merge then reads, checks and merges as always, and every error
message still comes from the normal readers. Only Linux (fork with a parent-death signal).
``LORA_LEGO_PREFETCH=0`` turns it off. Torch is never imported here, and nothing outside the standard
library and numpy.
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
from typing import Any, Sequence

import numpy as np

from .kmeans_core import MAX_ABS
from .lego_core import LEGO_CANONICALIZATIONS, LEGO_DEFAULTS, OUTPUT_REWEIGHTS, PARAM_REWEIGHTS, UNIT_SPLITS, PoolJob, \
    centroid_products, lego_coefficients, lego_pool
from .peft_rules import CONFIG_NAME, LINEAR_A_SUFFIX, LINEAR_B_SUFFIX, PREFIX, SAFETENSORS_NAME, lora_scale, \
    module_rank_alpha
from .torch_random import module_seed, torch_rand_float64

# Shared memory for the workers' results, at most: the modules beyond it are merged by the merge as usual.
# The 8 x Llama-2-7B rank-16 set needs 150 MB of merged factors (224 modules of 16 x (d_in + d_out)
# float32), which the merge keeps as they are until the output is written; without settings, 58 MB of
# Grams (2 x 128² float64 per module), each slot given back once the merge has taken it.
BUDGET_BYTES = 384 * 2**20
WORKERS = 2
BATCH = 8  # modules of equal pool size clustered in one k-means call (its cost is mostly fixed), at most
BATCH_BYTES = 128 * 2**20  # and no more than this many bytes of a worker's stacked float32 factors
MAX_BATCHES = 4096  # batch numbers (4 bytes each) written into the workers' pipe before they start
_READ_DTYPES = ("F16", "BF16", "F32")
_PAGE_ITEMS = mmap.PAGESIZE // 8


@dataclass(frozen=True)
class Settings:
    """What the merge computes, as read from the command line: output rank (None: the largest input rank),
    one weight per input, the seed, and lego's options (all of them, defaults filled in)."""

    rank: int | None
    weights: tuple[float, ...]
    seed: int
    options: tuple[tuple[str, Any], ...]


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
    slot: int  # offset of its results in the shared memory, in float64 items
    k: int = 0  # the output rank asked for (0: the merged factors are not computed, only the Grams)

    @property
    def pool(self) -> int:
        return sum(self.ranks)

    @property
    def items(self) -> int:
        if self.k:  # the number of merged units formed, then A' and B' as float32
            return 1 + -(-self.k * (self.d_in + self.d_out) // 2)
        return 2 * self.pool * self.pool + self.pool

    def gram_views(self, results: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Its G_A (P x P), G_B (P x P) and row signs (P) in the shared results (a slot planned without
        settings, k = 0), where a worker writes them and the parent reads them."""
        P = self.pool
        slot = results[self.slot:self.slot + self.items]
        return slot[:P * P].reshape(P, P), slot[P * P:2 * P * P].reshape(P, P), slot[2 * P * P:]

    def merged_views(self, results: np.ndarray, formed: int | None = None
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The number of merged units formed (one float64; 0 where the worker left the module to the merge)
        and, given ``formed``, A' (formed x d_in) and B' (d_out x formed) as float32, in the shared results
        (a slot planned with settings, k > 0)."""
        slot = results[self.slot:self.slot + self.items]
        if formed is None:
            return slot[:1], None
        room = slot[1:].view(np.float32)
        cut = formed * self.d_in
        return slot[:1], (room[:cut].reshape(formed, self.d_in),
                          room[cut:cut + formed * self.d_out].reshape(self.d_out, formed))


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


def plan_modules(dirs: Sequence[str], budget: int = BUDGET_BYTES, settings: Settings | None = None
                 ) -> list[PlannedModule]:
    """The modules the workers compute, in the merge's order (the first input's), as many as ``budget`` bytes
    of results hold; with ``settings`` the merged factors too. Raises on anything unexpected (the caller
    gives up)."""
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
            k = 0 if settings is None else (settings.rank if settings.rank is not None else max(ranks))
            module = PlannedModule(name, tuple(ranks), d_in, d_out, tuple(scales), tuple(a), tuple(b), used, k)
            if 8 * (used + module.items) > budget:
                break
            plan.append(module)
            used += -(-module.items // _PAGE_ITEMS) * _PAGE_ITEMS  # whole pages: a slot is freed once used
    return plan


def _to_float32(raw: np.ndarray, dtype: str, out: np.ndarray, work: np.ndarray, scale: float = 1.0) -> bool:
    """``raw`` (the file's bytes) as float32 into ``out``, times the float32 ``scale`` with one rounding:
    the value float32(x) * float32(scale) that converting and then multiplying gives (every F16 and BF16
    value is a float32), in one pass less. False where an F16 value is Inf or NaN (they are not converted
    as such; F32 and BF16 keep theirs, which the Grams' diagonals then show).

    numpy's own float16 cast is ~14x slower than torch's on x86; the bit pattern is rebuilt instead: the
    F16 bits sign-extended to 32 and shifted left by 13 put the exponent and mantissa in float32's place
    and copies of the sign in bits 28-31, of which the mask keeps bit 31: a float32 that is 2^-112 times
    the value (exact, subnormals included), times 2^112 * scale (exact while finite: a power of two times
    a float32), so the product is rounded once."""
    factor = np.float32(scale)
    if dtype == "F32":
        np.multiply(raw.view(np.float32).reshape(out.shape), factor, out=out)
        return True
    if dtype == "BF16":
        bits = work[:out.size].reshape(out.shape)
        np.left_shift(raw.view(np.uint16).reshape(out.shape), 16, out=bits, dtype=np.uint32)
        np.multiply(bits.view(np.float32), factor, out=out)
        return True
    bits = work[:out.size].view(np.int32).reshape(out.shape)
    np.left_shift(raw.view(np.int16).reshape(out.shape), 13, out=bits, dtype=np.int32)
    np.bitwise_and(bits, np.int32(0x8FFFFFFF - 2**32), out=bits)
    small = bits.view(np.float32)
    finite = bool(small.max() < 2.0 ** -96 and small.min() > -(2.0 ** -96))  # F16 exponent 31: Inf or NaN
    with np.errstate(over="ignore"):
        folded = factor * np.float32(2.0 ** 112)
    if np.isfinite(folded):
        np.multiply(small, folded, out=out)
    else:  # a scale of 2^16 or more: in two steps
        np.multiply(small, np.float32(2.0 ** 112), out=out)
        np.multiply(out, factor, out=out)
    return finite


def _conversion_exact() -> bool:
    """F16 conversion against numpy's own on subnormals, normals, signed zeros and the extremes: false where
    the CPU flushes subnormals (then no worker starts)."""
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


def plan_batches(plan: Sequence[PlannedModule]) -> list[list[int]]:
    """The planned modules (indices) in batches of consecutive ones of equal pool size, at most ``BATCH`` and
    ``BATCH_BYTES`` of stacked factors each: the units of work the workers take in turn."""
    largest = max((m.pool * max(m.d_in, m.d_out) for m in plan), default=0)
    size = max(1, min(BATCH, BATCH_BYTES // max(1, 8 * largest)))
    batches: list[list[int]] = []
    for i, m in enumerate(plan):
        if batches and len(batches[-1]) < size and plan[batches[-1][0]].pool == m.pool:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def compute(dirs: Sequence[str], plan: Sequence[PlannedModule], results: np.ndarray, settings: Settings | None = None,
            work_fd: int | None = None, done_fd: int | None = None, go_fd: int | None = None) -> None:
    """For each batch of ``plan_batches(plan)`` this worker takes (a 4-byte batch number read from ``work_fd``,
    shared with the other workers, until it is empty; every batch without one), after one byte or EOF on
    ``go_fd`` if given: read every input's factors into the stacked float32 A (P x d_in) and B (d_out x P,
    input j's scale multiplied in float32), as the merge's reader does, and compute G_A, G_B (float64 of
    the float32 products) and the row signs of A; without ``settings`` write them into ``results`` at the
    module's slot, with them lego's merged factors (``lego_core``, as methods/lego.py runs it). The batch
    number on ``done_fd`` once its slots are complete."""
    if go_fd is not None:
        os.read(go_fd, 1)
    fds = [os.open(os.path.join(d, SAFETENSORS_NAME), os.O_RDONLY) for d in dirs]
    batches = plan_batches(plan)
    largest = max((m.pool * max(m.d_in, m.d_out) for m in plan), default=0)
    raw = np.empty(4 * largest, np.uint8)
    work = np.empty(largest, np.uint32)
    stacks = [(np.empty(largest, np.float32), np.empty(largest, np.float32)) for _ in range(max(map(len, batches), default=0))]
    if settings is not None:  # the Grams stay here: the merge takes the merged factors
        pool = max((m.pool for m in plan), default=0)
        grams = [np.empty(2 * pool * pool + pool) for _ in stacks]
    order = iter(range(len(batches)))
    while True:
        if work_fd is None:
            number = next(order, None)
        else:
            token = os.read(work_fd, 4)
            number = struct.unpack("<I", token)[0] if len(token) == 4 else None
        if number is None:
            break
        batch = [plan[i] for i in batches[number]]
        factors = []
        for i, m in enumerate(batch):
            P = m.pool
            A = stacks[i][0][:P * m.d_in].reshape(P, m.d_in)
            B = stacks[i][1][:m.d_out * P].reshape(m.d_out, P)
            row, finite = 0, True
            for fd, r, scale, (off_a, dt_a), (off_b, dt_b) in zip(fds, m.ranks, m.scales, m.a, m.b):
                for offset, dtype, out, factor in ((off_a, dt_a, A[row:row + r], 1.0), (off_b, dt_b, B[:, row:row + r], scale)):
                    n = out.size * (4 if dtype == "F32" else 2)
                    if os.preadv(fd, [raw[:n]], offset) != n:
                        raise OSError("short read")
                    finite &= _to_float32(raw[:n], dtype, out, work, factor)
                row += r
            if settings is None:
                ga, gb, sign = m.gram_views(results)
            else:
                ga, gb, sign = grams[i][:P * P].reshape(P, P), grams[i][P * P:2 * P * P].reshape(P, P), grams[i][2 * P * P:2 * P * P + P]
            x = B.T  # the strides msu.gram64 sees for B.T of a C-ordered torch (d_out, P): the same BLAS call
            ga[...] = A @ A.T
            gb[...] = x @ x.T
            sign[...] = sign_of_largest(A)
            factors.append((A, B, ga, gb, sign, finite))
        if settings is not None:
            _merge_batch(batch, factors, results, settings)
        if done_fd is not None:
            os.write(done_fd, struct.pack("<I", number))


def _merge_batch(batch: Sequence[PlannedModule], factors: Sequence[tuple[np.ndarray, ...]], results: np.ndarray,
                 settings: Settings) -> None:
    """lego's merged factors of the modules in ``batch`` from their stacked factors, Grams and signs (A, B, G_A,
    G_B, sign, whether every F16 value read was finite), written into their slots. A module with a value
    that is not finite or beyond MAX_ABS (times the largest weight) is left to the merge, which refuses it
    with the error that names the file: such a value makes the diagonal of a Gram matrix (each row's or
    column's sum of squares) NaN, infinite or larger than MAX_ABS² (a conservative test: a module it
    rejects is merged by the merge as usual)."""
    options = dict(settings.options)
    bound = (MAX_ABS / max([1.0] + [abs(w) for w in settings.weights])) ** 2
    jobs, kept = [], []
    for m, (A, B, ga, gb, sign, finite) in zip(batch, factors):
        m.merged_views(results)[0][0] = 0.0
        peak = max(float(np.diagonal(ga).max()), float(np.diagonal(gb).max()))
        if not (finite and peak <= bound):  # NaN compares false
            continue
        pool = lego_pool(ga, gb, sign, m.ranks, m.scales, settings.weights, options["unit_split"], options["canonicalize"])
        seed = module_seed(settings.seed, m.name)
        jobs.append(PoolJob(pool, m.ranks, settings.weights, m.k, lambda shape, seed=seed: torch_rand_float64(seed, shape),
                            float(np.finfo(np.float32).eps)))
        kept.append((m, A, B))
    coefficients = lego_coefficients(jobs, param_reweight=options["param_reweight"],
                                     output_reweight=options["output_reweight"], canonicalize=options["canonicalize"],
                                     n_init=options["n_init"], max_iter=options["max_iter"])
    for (m, A, B), (Ca, Cb) in zip(kept, coefficients):
        formed, out = m.merged_views(results, Ca.shape[0])
        centroid_products(Ca, Cb, A, B, out=out)
        formed[0] = Ca.shape[0]


class GramPrefetch:
    """The parent's side: which inputs and modules were planned, with which settings, and the results as the
    workers finish them."""

    def __init__(self, dirs: list[str], plan: list[PlannedModule], memory: mmap.mmap, pids: list[int], done_fd: int,
                 go_fd: int | None = None, settings: Settings | None = None):
        self.dirs = dirs
        self.plan = {m.name: (i, m) for i, m in enumerate(plan)}
        self.settings = settings
        self.use_merged = False  # set by ``accept`` once the merge's settings are known to be the workers'
        self._memory = memory
        self._results = np.frombuffer(memory, dtype=np.float64)
        self._batches = plan_batches(plan)
        self._batch_of = {i: number for number, batch in enumerate(self._batches) for i in batch}
        self._pids = pids
        self._done_fd = done_fd
        self._go_fd = go_fd
        self._done: set[int] = set()  # batch numbers the workers completed
        self._partial = b""
        self._ended = False
        self.taken = 0
        self.merged_taken = 0

    def go(self) -> None:
        """Let the workers that wait for it start (the CLI calls this once torch is imported: until then
        one worker shares the two cores with the import, whose time is all on the critical path)."""
        if self._go_fd is not None:
            os.close(self._go_fd)  # EOF: every worker waiting on it starts
            self._go_fd = None

    def matches(self, paths: Sequence[str]) -> bool:
        """Whether the merge's inputs are the ones planned for, in the same order."""
        return [os.path.realpath(p) for p in paths] == self.dirs

    def accept(self, rank: int | None, weights: Sequence[float], seed: int, options: dict[str, Any],
               method: str = "lego") -> bool:
        """Use the workers' merged factors only if the merge is lego with the settings they assumed."""
        ours = Settings(rank, tuple(float(w) for w in weights), int(seed), tuple(sorted(options.items())))
        self.use_merged = method == "lego" and self.settings is not None and ours == self.settings
        return self.use_merged

    def _ready(self, name: str, ranks: Sequence[int], d_in: int, d_out: int, scales: Sequence[float]
               ) -> PlannedModule | None:
        """The planned module ``name`` once a worker has written it (waiting for that); None where it was not
        planned, what the merge read differs from the plan, or the workers stopped before it."""
        entry = self.plan.get(name)
        if entry is None or not self._pids:
            return None
        index, m = entry
        if (list(m.ranks), m.d_in, m.d_out, list(m.scales)) != (list(ranks), d_in, d_out, list(scales)):
            return None
        number = self._batch_of[index]
        self.go()
        while number not in self._done and not self._ended:
            self._read_done()
        return m if number in self._done else None

    def _read_done(self) -> None:
        """Read the batch numbers the workers reported (4 bytes each; EOF once every worker has exited)."""
        got = os.read(self._done_fd, 65536)
        self._ended = not got
        data = self._partial + got
        whole = len(data) - len(data) % 4
        self._done.update(struct.unpack(f"<{whole // 4}I", data[:whole]))
        self._partial = data[whole:]

    def _release(self, m: PlannedModule) -> None:
        """Give the slot's memory back (both processes'): each slot is read once."""
        if hasattr(mmap, "MADV_REMOVE"):
            try:
                self._memory.madvise(mmap.MADV_REMOVE, 8 * m.slot, 8 * m.items)
            except OSError:
                pass

    def take_merged(self, name: str, ranks: Sequence[int], d_in: int, d_out: int, scales: Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """lego's merged factors (A', B') of ``name``, float32 views of the shared memory (``accept`` must have
        been called), or None where the workers did not form them."""
        m = self._ready(name, ranks, d_in, d_out, scales) if self.use_merged else None
        if m is None or not m.k:
            return None
        formed = int(m.merged_views(self._results)[0][0])
        if formed < 1:
            return None
        self.merged_taken += 1
        # views, not copies (150 MB for the 8 x Llama-7B set, page faults and all, on the merge's critical
        # path): the slot stays until the last view is gone, also after ``close``
        return m.merged_views(self._results, formed)[1]

    def take(self, name: str, ranks: Sequence[int], d_in: int, d_out: int, scales: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(G_A, G_B, sign) of ``name`` as float64 copies, waiting for its worker if it has not reached it yet;
        None where it was not planned, what the merge read differs from the plan, or the worker stopped."""
        m = self._ready(name, ranks, d_in, d_out, scales)
        if m is None or m.k:
            return None
        out = tuple(view.copy() for view in m.gram_views(self._results))
        self._release(m)
        self.taken += 1
        return out

    def wait(self) -> int:
        """Wait for the workers to finish; how many modules they completed."""
        self.go()
        while self._pids and len(self._done) < len(self._batches) and not self._ended:
            self._read_done()
        return sum(len(self._batches[number]) for number in self._done)

    def close(self) -> None:
        """Stop the workers that still run and free everything (idempotent)."""
        global ACTIVE
        if self._pids and os.environ.get("LORA_LEGO_PREFETCH_STATS"):  # a diagnostic for benchmarks and tests
            print(f"lora-lego prefetch: {len(self.plan)} modules planned, "
                  f"{sum(len(self._batches[number]) for number in self._done)} computed, "
                  f"{self.merged_taken} merged and {self.taken} Grams used", file=sys.stderr)
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if self._pids:
            self._pids = []
            self.go()
            os.close(self._done_fd)
            del self._results
            try:
                self._memory.close()
            except BufferError:  # merged factors taken are still in use: unmapped with the last of them
                pass
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


def lego_settings(args: Sequence[str], inputs: int) -> Settings | None:
    """The rank, weights, seed and lego options of a `merge` or `prune` command line (``lego_inputs``'s), read
    roughly (exact flags only, no abbreviations); None where something does not parse. The merge compares
    them with its own (``GramPrefetch.accept``) before it uses anything computed with them."""
    flags = {"--rank": int, "--seed": int}
    flags.update({"--" + key.replace("_", "-"): type(value) for key, value in LEGO_DEFAULTS.items()})
    found: dict[str, Any] = {}
    weights = None
    i = 1
    try:
        while i < len(args):
            key, eq, value = args[i].partition("=")
            i += 1
            if key == "--weights":
                weights = [float(value)] if eq else []
                while not eq and i < len(args) and _is_number(args[i]):  # argparse: --weights=W takes one
                    weights.append(float(args[i]))
                    i += 1
            elif key in flags:
                if not eq:
                    value = args[i]
                    i += 1
                found[key] = flags[key](value)
    except (IndexError, ValueError):
        return None
    options = {key: found.get("--" + key.replace("_", "-"), default) for key, default in LEGO_DEFAULTS.items()}
    if options["param_reweight"] not in PARAM_REWEIGHTS or options["output_reweight"] not in OUTPUT_REWEIGHTS \
            or options["unit_split"] not in UNIT_SPLITS or options["canonicalize"] not in LEGO_CANONICALIZATIONS \
            or options["n_init"] < 1 or options["max_iter"] < 1:
        return None
    rank = found.get("--rank")
    if weights is None:
        weights = [1.0] * inputs  # lego's default weights
    if (rank is not None and rank < 1) or len(weights) != inputs or (args[0] == "prune" and weights != [1.0]):
        return None
    return Settings(rank, tuple(weights), found.get("--seed", 0), tuple(sorted(options.items())))


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def keep_freed_memory() -> None:
    """glibc only: serve allocations up to 32 MB from the heap and keep freed heap memory for reuse, instead
    of returning it to the system and taking it back as fresh zeroed pages for the next module (page faults:
    the merge's threads 0.08 s of 0.84 s on the 8 x Llama-7B set; k-means' arrays of a batch, ~1 MB each,
    would otherwise each be a fresh mapping). For the CLI, whose process ends after the merge, so holding on
    to freed memory costs nothing. The same as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, which a
    user's own setting overrides."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD (glibc's largest allowed)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(-1, 2**30)  # M_TRIM_THRESHOLD


def start_for_cli() -> None:
    """Start the workers where this process is a lego merge of PEFT folders on the CPU (see the module's
    docstring); anything else, or any failure, leaves ``ACTIVE`` None and the merge works as without."""
    global ACTIVE
    if ACTIVE is not None or os.environ.get("LORA_LEGO_PREFETCH", "1") == "0" or not sys.platform.startswith("linux"):
        return
    args = cli_arguments()
    dirs = lego_inputs(args) if args is not None else None
    if dirs:
        keep_freed_memory()  # before the fork: the workers' k-means and products allocate per batch
        ACTIVE = start(dirs, settings=lego_settings(args, len(dirs)))
        if ACTIVE is not None:
            atexit.register(ACTIVE.close)


def start(dirs: Sequence[str], budget: int = BUDGET_BYTES, settings: Settings | None = None, workers: int = WORKERS
          ) -> GramPrefetch | None:
    """Fork the workers that compute the PEFT folders ``dirs``' Grams (and with ``settings`` the merged
    factors); None where there is nothing to do or the plan fails. Before torch is imported, as the CLI
    does, or at least before any other thread is started: a fork copies only the calling thread."""
    dirs = [os.path.realpath(d) for d in dirs]
    try:
        plan = plan_modules(dirs, budget, settings)
    except Exception:
        return None
    if not plan or not _conversion_exact():
        return None
    batches = plan_batches(plan)
    if len(batches) > MAX_BATCHES:  # their numbers must fit in the pipe at once
        plan = plan[:batches[MAX_BATCHES][0]]
        batches = batches[:MAX_BATCHES]
    parent = os.getpid()
    opened: list[int] = []
    try:
        memory = mmap.mmap(-1, 8 * (plan[-1].slot + plan[-1].items))
        for _ in range(3):
            opened.extend(os.pipe())
        work_r, work_w, done_r, done_w, go_r, go_w = opened
        os.write(work_w, struct.pack(f"<{len(batches)}I", *range(len(batches))))  # 16 KB at most: fits the pipe
        os.close(work_w)
    except OSError:  # out of memory or descriptors: the merge works as without
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass
        return None
    pids: list[int] = []
    for worker in range(max(1, min(workers, len(batches)))):
        try:
            pid = os.fork()
        except OSError:  # no more processes or memory: fewer workers (the batches are shared), or none
            break
        if pid == 0:  # a worker: compute, never return into the caller's code
            code = 0
            try:
                for fd in (done_r, go_w):
                    os.close(fd)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
                _die_with_parent(parent)
                compute(dirs, plan, np.frombuffer(memory, dtype=np.float64), settings, work_r, done_w,
                        go_r if worker else None)
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    for fd in (work_r, done_w, go_r):
        os.close(fd)
    if not pids:
        for fd in (done_r, go_w):
            os.close(fd)
        memory.close()
        return None
    return GramPrefetch(dirs, plan, memory, pids, done_r, go_w, settings)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies (Linux's prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(0)
