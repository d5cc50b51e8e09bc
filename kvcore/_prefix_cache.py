"""Prefix caching: chained block hashes over raw int32 token bytes (vLLM's scheme).

Block ``i``'s hash is ``hash((hash of block i-1, the block's token ids as int32
bytes))``, starting from a root derived from the config's seed and the request's
``extra_key``.  Only full blocks are hashed, each once.  Python's built-in ``hash`` is
fast and good enough because a hit is confirmed by comparing the stored token bytes:
a collision can cost a miss, never someone else's data.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._block_pool import BlockPool
from .models import AllocationRequest

__all__ = ["PrefixPlan", "plan_prefix", "root_hash", "hash_full_blocks"]

_INT32_MAX = 2**31 - 1
#: array('I') is 4 bytes on every mainstream platform; elsewhere use numpy only.
_FAST_U32 = array("I").itemsize == 4 and np.dtype(np.uint32).byteorder in "=|"


class PrefixPlan(NamedTuple):
    #: Blocks the request occupies in all.
    total_blocks: int
    #: Leading blocks found in the cache, in order.
    hits: list[int]
    #: The chained hash of every full prompt block.
    hashes: list[int]
    #: The prompt as int32 bytes (empty when not hashing).
    token_bytes: bytes


def root_hash(seed: int, extra_key: str | None) -> int:
    return hash(("kvcore-prefix", seed, extra_key))


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as int32 bytes, refusing ids outside int32 with a ValueError."""
    if _FAST_U32 and isinstance(tokens, (tuple, list)):
        # array('I') converts a tuple of ints ~5x faster than np.asarray (which first
        # discovers the sequence's shape and type) and itself refuses ids below 0 or
        # above 2**32 - 1; ids in [0, 2**31) have the same bytes as uint32 and int32.
        try:
            packed = array("I", tokens)
        except (OverflowError, TypeError):
            pass  # let the general path below name the bad id
        else:
            if not packed or np.frombuffer(packed, np.uint32).max() <= _INT32_MAX:
                return packed.tobytes()
    array_ = np.asarray(tokens, dtype=np.int64)
    if array_.size and (array_.min() < 0 or array_.max() > _INT32_MAX):
        bad = int(array_.min() if array_.min() < 0 else array_.max())
        raise ValueError(f"token id {bad} is outside [0, {_INT32_MAX}]")
    return array_.astype(np.int32).tobytes()


def plan_prefix(pool: BlockPool, request: AllocationRequest, block_size: int, root: int,
                enabled: bool, complete: np.ndarray) -> PrefixPlan:
    """What allocating ``request`` would take from ``pool``.  Side-effect free.

    A cached block is a hit only if ``complete[block]``: its K/V are written for every
    layer.  A block still waiting for its owner's prefill is not shared; the request
    gets its own, so nobody ever reads K/V that were not written yet.
    """
    n = request.num_tokens or 0
    total = -(-n // block_size)
    tokens = request.prompt_token_ids
    if tokens is None or not enabled:
        return PrefixPlan(total, [], [], b"")
    buf = token_bytes(tokens)
    stride = 4 * block_size
    lookup = pool.lookup
    hashes: list[int] = []
    hits: list[int] = []
    parent = root
    matching = True
    for i in range(n // block_size):
        chunk = buf[i * stride:(i + 1) * stride]
        parent = hash((parent, chunk))
        hashes.append(parent)
        if matching:
            block = lookup(parent, chunk)
            if block is None or not complete[block]:
                matching = False
            else:
                hits.append(block)
    return PrefixPlan(total, hits, hashes, buf)


def hash_full_blocks(parent: int, pending: list[int], block_size: int) -> list[tuple[int, bytes]]:
    """Hash every full block at the front of ``pending`` (consuming it), chained from
    ``parent``; returns ``(hash, token_bytes)`` per block."""
    out = []
    while len(pending) >= block_size:
        chunk = token_bytes(pending[:block_size])
        parent = hash((parent, chunk))
        out.append((parent, chunk))
        del pending[:block_size]
    return out
