"""A seeded permutation of ``range(n)`` that is computed, never stored.

Why computed: a shuffled order of every sample of a trillion-token corpus is
hundreds of millions of indices, gigabytes if materialised.  OLMo-core and Megatron
store it in a cache file; that file must be built before step 1 (minutes at that
size), kept in sync with the data, and written by one rank while the others wait.
A keyed bijection gives the same thing with nothing stored: ``permute(i)`` for any
``i`` in O(1), so start-up and memory do not grow with the corpus, and every rank
and every restart computes the same order from ``(n, seed)`` alone.

How: a four-round Feistel network on ``2 * half`` bits (the smallest even width
that covers ``n``), whose round function is the splitmix64 finaliser of the half
block xor a round key.  Any Feistel network is a bijection of its ``2 ** (2*half)``
values; "cycle walking" (apply it again while the result is ``>= n``) restricts it
to a bijection of ``range(n)``, with fewer than four applications on average since
the domain is less than ``4 n``.  Keys come from the seed through splitmix64, so
two seeds give unrelated orders.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of ``range(n)`` chosen by ``seed``; ``Permutation(n, seed)(i)``."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        with np.errstate(over="ignore"):
            state = np.array([seed % (1 << 64)], dtype=np.uint64)
            self.keys = [_mix(state + _GOLDEN * np.uint64(r + 1))[0] for r in range(ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        """The permuted position of each index (int64 array, or the same shape as ``index``)."""
        i = np.asarray(index, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"index outside range({self.n})")
        x = i.astype(np.uint64).reshape(-1)
        n = np.uint64(self.n)
        with np.errstate(over="ignore"):
            x = self._feistel(x)
            outside = x >= n
            while outside.any():  # cycle walking: at most a few rounds for any index
                x[outside] = self._feistel(x[outside])
                outside = x >= n
        return x.astype(np.int64).reshape(i.shape)
