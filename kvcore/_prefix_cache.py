"""Prefix caching: chained block hashes over int32 token ids, computed in bulk.

Block ``i`` of a prompt is keyed by a 64-bit chained hash::

    h[-1] = root                               (from the config's seed and extra_key)
    h[i]  = h[i-1] * M + dot(tokens of block i, W)     (mod 2**64)

with ``W`` odd per-position weights drawn from the seed and ``M`` an odd constant, so a
key depends on every token before it, in order (vLLM's chaining, without hashing each
block in Python).  Unrolled, ``h[i] = M**(i+1) * root + M**i * cumsum(c[j] * M**-j)``:
a whole prompt's keys take a handful of numpy calls (``M`` is odd, hence invertible
mod 2**64).  Only full blocks are keyed.

It is not a cryptographic hash.  A hit is confirmed by comparing the block's stored
token ids, so an accidental collision needs two different prefixes with equal 64-bit
keys *and* an identical block; where tenants must not probe each other's prompts, give
every deployment a secret ``CacheConfig.hash_seed``.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._block_pool import BlockPool
from .models import AllocationRequest

__all__ = ["ChainHasher", "PrefixPlan", "plan_prefix", "token_array"]

_INT32_MAX = 2**31 - 1
_MASK = 2**64 - 1
_M = 0x9E3779B97F4A7C15  # odd: invertible mod 2**64
_M_INV = pow(_M, -1, 2**64)
#: array('I') is 4 bytes on every mainstream platform; elsewhere use numpy only.
_FAST_U32 = array("I").itemsize == 4 and np.dtype(np.uint32).byteorder in "=|"


def token_array(tokens: Sequence[int]) -> np.ndarray:
    """Token ids as an int32 array, refusing ids outside int32 with a ValueError."""
    if _FAST_U32 and isinstance(tokens, (tuple, list)):
        # array('I') converts a tuple of ints several times faster than np.asarray
        # and itself refuses ids below 0 or above 2**32 - 1.
        try:
            packed = np.frombuffer(array("I", tokens), np.uint32)
        except (OverflowError, TypeError):
            pass  # let the general path below name the bad id
        else:
            if not packed.size or packed.max() <= _INT32_MAX:
                return packed.view(np.int32)
    values = np.asarray(tokens, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > _INT32_MAX):
        bad = int(values.min() if values.min() < 0 else values.max())
        raise ValueError(f"token id {bad} is outside [0, {_INT32_MAX}]")
    return values.astype(np.int32)


class ChainHasher:
    """Chained block keys for one block size and seed (see the module docstring)."""

    def __init__(self, block_size: int, seed: int) -> None:
        rng = np.random.default_rng(seed & _MASK)
        self.block_size = block_size
        self._seed = seed
        self._weights = rng.integers(0, 2**63, block_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._pow = np.ones(1, dtype=np.uint64)      # M**0, M**1, ...
        self._inv_pow = np.ones(1, dtype=np.uint64)  # M**0, M**-1, ...

    def root(self, extra_key: str | None) -> int:
        """The chain's start for prompts cached under ``extra_key``."""
        return hash(("kvcore-prefix", self._seed, extra_key)) & _MASK

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


class PrefixPlan(NamedTuple):
    #: Blocks the request occupies in all.
    total_blocks: int
    #: Leading blocks found in the cache, in order.
    hits: list[int]
    #: The key of every full prompt block.
    keys: list[int]
    #: The full prompt blocks' token ids, ``[len(keys), block_size]`` int32.
    rows: np.ndarray | None


def plan_prefix(pool: BlockPool, hasher: ChainHasher, request: AllocationRequest,
                enabled: bool, complete: np.ndarray) -> PrefixPlan:
    """What allocating ``request`` would take from ``pool``.  Side-effect free.

    A cached block is a hit only if ``complete[block]``: its K/V are written for every
    layer.  A block still waiting for its owner's prefill is not shared; the request
    gets its own, so nobody ever reads K/V that were not written yet.
    """
    n = request.num_tokens or 0
    bs = hasher.block_size
    total = -(-n // bs)
    tokens = request.prompt_token_ids
    if tokens is None or not enabled:
        return PrefixPlan(total, [], [], None)
    full = n // bs
    rows = token_array(tokens)[:full * bs].reshape(full, bs)
    keys = hasher.keys(rows, hasher.root(request.extra_key)).tolist()
    return PrefixPlan(total, pool.lookup_run(keys, rows, complete), keys, rows)
