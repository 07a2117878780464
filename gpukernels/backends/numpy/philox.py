"""Philox4x32-10 in vectorised NumPy, bit for bit as Triton's ``tl.randint`` /
``tl.rand`` compute it (triton/language/random.py), so that a dropout mask
drawn here equals the one a Triton (or CUDA) kernel draws for the same seed.

Triton's round is Random123's: counter words ``(c0, c1, c2, c3)``, key words
``(k0, k1)`` with ``k0`` the low and ``k1`` the high 32 bits of the seed. For
``tl.rand(seed, offsets)`` the counter is ``(offset lo, offset hi, 0, 0)`` and
the result is the first output word mapped to a float in [0, 1).

Dropout draws four elements from each Philox call (``element_words``):
element ``i`` takes output word ``i % 4`` of counter ``(i // 4 lo, i // 4 hi, 0, 0)``.
The generator is what bounds a dropout kernel's speed, and this draws a quarter
of the calls ``tl.rand`` per element would. It keeps an element when the
word's uniform is above ``p``, decided without the uniform: see ``backends/_dropout.py``.
"""

from __future__ import annotations

import numpy as np

from .._dropout import uint_to_uniform_float

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
_ROUNDS = 10


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


def element_words(seed: int, n: int) -> np.ndarray:
    """The uint32 word of each of ``n`` elements: element ``i`` takes output
    word ``i % 4`` of the Philox call on counter ``i // 4``."""
    groups = np.arange((n + 3) // 4, dtype=np.uint64)
    lo = (groups & np.uint64(_MASK32)).astype(np.uint32)
    hi = (groups >> np.uint64(32)).astype(np.uint32)
    return np.stack(philox4x32(seed, lo, hi), axis=1).reshape(-1)[:n]
