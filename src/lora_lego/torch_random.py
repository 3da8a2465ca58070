"""Torch-free, bit-exact replica of ``torch.rand(..., dtype=torch.float64)`` on a CPU generator.

Mirrors ATen's CPU generator: ``at::mt19937`` (MT19937RNGEngine.h), ``CPUGeneratorImpl::random64``
and ``transformation::uniform_real`` (TransformationHelper.h). Imports only numpy and the stdlib,
so seeded noise can be reproduced without loading torch.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

_N, _M = 624, 397
_MATRIX_A = np.uint32(0x9908B0DF)
_UPPER, _LOWER = np.uint32(0x80000000), np.uint32(0x7FFFFFFF)


def _seed_state(seed: int) -> np.ndarray:
    """Standard ``init_genrand``: torch keeps only ``seed & 0xffffffff`` (state words are uint32)."""
    s, p = [0] * _N, seed & 0xFFFFFFFF
    s[0] = p
    for j in range(1, _N):  # sequential recurrence: plain ints beat numpy here
        p = (1812433253 * (p ^ (p >> 30)) + j) & 0xFFFFFFFF
        s[j] = p
    return np.array(s, dtype=np.uint32)


def _twist(x: np.ndarray) -> np.ndarray:
    """One full MT19937 state regeneration, vectorised in blocks of 227 (= N - M) words.

    new[i] = src[i + M] ^ twist(old[i], old[i + 1]) where src[i + M] is an old word for
    i < 227 and an already regenerated word (new[i - 227]) afterwards.
    """
    y = (x[:-1] & _UPPER) | (x[1:] & _LOWER)
    mag = (y >> np.uint32(1)) ^ np.where(x[1:] & np.uint32(1), _MATRIX_A, np.uint32(0))
    new, k = np.empty(_N, dtype=np.uint32), _N - _M
    new[:k] = x[_M:] ^ mag[:k]
    for lo in range(k, _N - 1, k):  # each block depends only on earlier blocks
        hi = min(lo + k, _N - 1)
        new[lo:hi] = new[lo - k:hi - k] ^ mag[lo:hi]
    # the last word pairs with the *new* word 0 (ATen: twist(p[0], state_[0]))
    y_last = (int(x[-1]) & 0x80000000) | (int(new[0]) & 0x7FFFFFFF)
    new[-1] = int(new[_M - 1]) ^ (y_last >> 1) ^ (0x9908B0DF if int(new[0]) & 1 else 0)
    return new


def _mt19937_uint32(seed: int, count: int) -> np.ndarray:
    """First ``count`` tempered outputs of torch's mt19937 seeded with ``seed``."""
    state, blocks = _seed_state(seed), []
    for _ in range(-(-count // _N)):
        state = _twist(state)  # ATen twists before the very first output (left_ = 1)
        blocks.append(state)
    y = np.concatenate(blocks)[:count] if blocks else np.empty(0, np.uint32)
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    return y ^ (y >> np.uint32(18))


def torch_rand_float64(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Equal, bit for bit, to ``torch.rand(*shape, generator=g, dtype=torch.float64)``
    after ``g = torch.Generator(); g.manual_seed(seed)``.

    Only ``seed & 0xffffffff`` matters. Elements are filled serially in C order (ATen's
    ``cpu_serial_kernel``, whatever the size or thread count). Each uses ``random64() = (a << 32) | b`` from two
    consecutive 32-bit outputs a, b, keeps its low 53 bits and multiplies by 2**-53 (exact).
    """
    n = math.prod(shape)
    u = _mt19937_uint32(seed, 2 * n).astype(np.uint64)
    bits = ((u[0::2] & np.uint64(0x1FFFFF)) << np.uint64(32)) | u[1::2]
    return (bits.astype(np.float64) * 2.0**-53).reshape(shape)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the module's name, not its position, so that adding or removing
    other modules does not change this module's result (the merge seeds each module's generator with it)."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)
