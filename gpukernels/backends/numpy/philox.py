"""Philox4x32-10 in vectorised NumPy, bit for bit as Triton's ``tl.randint`` /
``tl.rand`` compute it (triton/language/random.py), so that a dropout mask
drawn here equals the one a Triton (or CUDA) kernel draws for the same seed.

Triton's round is Random123's: counter words ``(c0, c1, c2, c3)``, key words
``(k0, k1)`` with ``k0`` the low and ``k1`` the high 32 bits of the seed. For
``tl.rand(seed, offsets)`` the counter is ``(offset lo, offset hi, 0, 0)`` and
the result is the first output word mapped to a float in [0, 1).

Dropout draws eight elements from each Philox call (``element_halves``): element
``i`` takes the 16-bit half ``i % 2`` (low first) of output word ``(i % 8) // 2``
of counter ``(i // 8 lo, i // 8 hi, 0, 0)``; backends/_dropout.py has the keep
test and why.
"""

from __future__ import annotations

import numpy as np

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
_ROUNDS = 10
# Largest float32 s with (2**31 - 1) * s < 1 after rounding: uniforms stay below 1.
_UNIFORM_SCALE = np.float32(4.6566127342e-10)


def _mul_hi_lo(multiplier: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit words of ``multiplier * c`` (a 64-bit product)."""
    product = c.astype(np.uint64) * np.uint64(multiplier)
    return (product >> np.uint64(32)).astype(np.uint32), product.astype(np.uint32)


def philox4x32(seed: int, c0, c1, c2=0, c3=0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four uint32 output words of Philox4x32-10 for the 64-bit key
    ``seed`` (negative seeds as their two's complement, as Triton's int64 ->
    uint64 cast does) and the counter words ``c0..c3`` (uint32 arrays or
    scalars, broadcast together)."""
    seed &= _MASK64
    k0, k1 = seed & _MASK32, seed >> 32
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3)))
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ np.uint32(k0)
        c2 = hi_a ^ c3 ^ np.uint32(k1)
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def folded(bits: np.ndarray) -> np.ndarray:
    """uint32 words as the int32 in [0, 2**31) that ``uint_to_uniform_float``
    scales: ``~x`` maps the negative half onto the positive one, so the sign
    bit is not wasted."""
    signed = np.asarray(bits, dtype=np.uint32).view(np.int32)
    return np.where(signed < 0, ~signed, signed)


def uint_to_uniform_float(bits: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in [0, 1)."""
    return folded(bits).astype(np.float32) * _UNIFORM_SCALE


def randint(seed: int, offsets: np.ndarray) -> np.ndarray:
    """``tl.randint(seed, offsets)`` for int64 ``offsets``, as uint32."""
    offsets = np.asarray(offsets, dtype=np.int64).view(np.uint64)
    lo = (offsets & np.uint64(_MASK32)).astype(np.uint32)
    hi = (offsets >> np.uint64(32)).astype(np.uint32)
    return philox4x32(seed, lo, hi)[0]


def uniform(seed: int, offsets: np.ndarray | int) -> np.ndarray:
    """``tl.rand(seed, offsets)``: float32 uniforms in [0, 1) for int64
    ``offsets``, or for ``arange(offsets)`` when given a count."""
    if isinstance(offsets, (int, np.integer)):
        offsets = np.arange(offsets, dtype=np.int64)
    return uint_to_uniform_float(randint(seed, offsets))


def element_halves(seed: int, n: int) -> np.ndarray:
    """The 16-bit half (uint16) each of ``n`` elements draws: element ``i`` takes half
    ``i % 2`` (the low one first) of output word ``(i % 8) // 2`` of the Philox call on
    counter ``i // 8``."""
    calls = np.arange((n + 7) // 8, dtype=np.uint64)
    lo = (calls & np.uint64(_MASK32)).astype(np.uint32)
    hi = (calls >> np.uint64(32)).astype(np.uint32)
    words = np.stack(philox4x32(seed, lo, hi), axis=1)  # (calls, 4)
    halves = np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=2)  # (calls, 4, 2)
    return halves.reshape(-1)[:n].astype(np.uint16)
