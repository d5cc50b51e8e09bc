"""Prefix-cache lookup keys, chained over a sequence's full blocks, computed in bulk.

Block ``i`` of a token sequence gets a 64-bit key that depends on every token before
it, in order (vLLM's chaining, without hashing each block in Python)::

    k[-1] = root(salt)
    k[i]  = k[i-1] * M + dot(tokens of block i, W)      (mod 2**64)

``W`` are odd per-position weights and ``root`` a per-salt start, both drawn from the
manager's secret; ``M`` is an odd constant, hence invertible mod 2**64, so a whole
prompt's keys unroll to a handful of numpy calls::

    k[i] = M**(i+1) * root + M**i * cumsum_j(c[j] * M**-j)      c[j] = dot(block j, W)

**A key only finds candidates.**  :class:`~kvcore._prefix_index.PrefixIndex` accepts
a cached block only when the whole chain matches exactly (its recorded parent block,
its token ids and its salt), so a key collision, accidental or crafted, costs a
miss and never returns another prefix's K/V.  The key is therefore not a
cryptographic hash; by default its weights come from a random per-manager secret
(``CacheConfig.hash_seed=None``), so nothing outside the process can aim at it, and
a fixed seed gives reproducible keys for tests.  Keys that leave the process (a
shared store) are cryptographic: :mod:`kvcore._chain_digests` computes them when a
store or ``CacheConfig.crypto_block_keys`` asks (about 0.44 us per 16-token block,
against about 0.05 us for these; ``kvcore bench -w store``).
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ChainHasher", "MAX_TOKEN_ID", "token_array"]

#: Token ids are int32 and non-negative: ``0 <= id <= MAX_TOKEN_ID``.
MAX_TOKEN_ID = 2**31 - 1
_MASK = 2**64 - 1
_M = 0x9E3779B97F4A7C15  # odd: invertible mod 2**64
_M_INV = pow(_M, -1, 2**64)
#: array('I') is 4 bytes on every mainstream platform; elsewhere use numpy only.
_FAST_U32 = array("I").itemsize == 4 and np.dtype(np.uint32).byteorder in "=|"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def token_array(tokens: Any, what: str = "token_ids") -> np.ndarray:
    """``tokens`` as a one-dimensional int32 array, after checking every id is an int
    (not a bool, not a float) in ``0..MAX_TOKEN_ID``.  ``TypeError`` / ``ValueError``
    name the first offending id and its position."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise TypeError(f"{what} must be a one-dimensional sequence of ints, got an "
                            f"array of dtype {tokens.dtype} and shape {list(tokens.shape)}")
        if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
            i = int(np.argmax((tokens < 0) | (tokens > MAX_TOKEN_ID)))
            raise ValueError(f"{what}[{i}] is {int(tokens[i])}; token ids must be in "
                             f"0..{MAX_TOKEN_ID}")
        return tokens.astype(np.int32)
    if not isinstance(tokens, (list, tuple, range)):
        raise TypeError(f"{what} must be a list, tuple or array of ints, got "
                        f"{type(tokens).__name__}")
    if _FAST_U32 and set(map(type, tokens)) <= {int}:
        # array('I') converts several times faster than np.asarray and itself refuses
        # ids below 0 or above 2**32 - 1 (the general path below names them).
        try:
            packed = np.frombuffer(array("I", tokens), np.uint32)
        except OverflowError:
            packed = None
        if packed is not None and (not packed.size or packed.max() <= MAX_TOKEN_ID):
            return packed.view(np.int32)
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{what}[{i}] is {_describe(t)} ({type(t).__name__}); token ids "
                            "must be ints")
        if not 0 <= t <= MAX_TOKEN_ID:
            raise ValueError(f"{what}[{i}] is {int(t)}; token ids must be in 0..{MAX_TOKEN_ID}")
    return np.array([int(t) for t in tokens], dtype=np.int32)


class ChainHasher:
    """Chained block keys for one block size and secret (see the module docstring)."""

    def __init__(self, block_size: int, seed: int | None = None) -> None:
        #: The secret; drawn at random unless given.
        self.seed = secrets.randbits(64) if seed is None else int(seed) & _MASK
        rng = np.random.default_rng(self.seed)
        self.block_size = block_size
        self._weights = rng.integers(0, 2**63, block_size, dtype=np.uint64) * np.uint64(2) \
            + np.uint64(1)
        self._pow = np.ones(1, dtype=np.uint64)      # M**0, M**1, ...
        self._inv_pow = np.ones(1, dtype=np.uint64)  # M**0, M**-1, ...

    def root(self, salt: str | None) -> int:
        """The chain's start for sequences cached under ``salt`` (``extra_key``); not
        remembered here (the manager's salt registry keeps the live ones)."""
        text = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(text, digest_size=8, key=self.seed.to_bytes(8, "little")).digest()
        return int.from_bytes(digest, "little")

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pow.size < n:
            size = max(n, 2 * self._pow.size)
            m = np.full(size, _M, dtype=np.uint64)
            m[0] = 1
            inv = np.full(size, _M_INV, dtype=np.uint64)
            inv[0] = 1
            self._pow, self._inv_pow = np.cumprod(m), np.cumprod(inv)  # wrap mod 2**64
        return self._pow, self._inv_pow

    def keys(self, blocks: np.ndarray, parent: int) -> np.ndarray:
        """Keys of ``blocks`` (``[n, block_size]`` token ids) chained after ``parent``."""
        n = blocks.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        pw, inv = self._powers(n + 1)
        content = blocks.astype(np.uint64) @ self._weights
        acc = np.cumsum(content * inv[:n])
        return pw[1:n + 1] * np.uint64(parent) + pw[:n] * acc

    def step(self, parents: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """One chain step for many sequences at once: ``parents[i]`` (uint64) followed
        by ``blocks[i]`` (``[n, block_size]``): the keys of a decode step's completed
        blocks, one per sequence."""
        return parents.astype(np.uint64) * np.uint64(_M) + blocks.astype(np.uint64) @ self._weights

    def __reduce__(self) -> Any:
        raise TypeError("a ChainHasher holds its manager's secret and is not pickled")


def chain_keys(hasher: ChainHasher, tokens: Sequence[int] | np.ndarray, salt: str | None) -> np.ndarray:
    """The keys of every full block of ``tokens`` under ``salt`` (tests, tools)."""
    rows = token_array(tokens)
    full = rows.shape[0] // hasher.block_size
    return hasher.keys(rows[:full * hasher.block_size].reshape(full, hasher.block_size),
                       hasher.root(salt))
