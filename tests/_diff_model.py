"""The dense reference model of the differential test (tests/test_differential.py).

Each live request is a plain dense record: its length, its known token ids, and per
layer the K and V bits it must read back and how many positions are written.  A
write changes only the request written; a fork copies the record; nothing is ever
shared.  The manager under test must agree with it bit for bit, however it shares
blocks inside.

**What a prefix hit may return.**  A request allocated with a prompt may be served
leading blocks from the prefix cache.  Their content is legitimate only if some
request with the *identical* chain (same salt, same token ids from position 0 to the
end of the block) held exactly that content, for that layer, while its block was
fully written.  The model keeps that set per ``(salt, chain, layer)`` (``allowed``),
fills it from every write of a request whose token ids are known, and empties it on
``reset_prefix_cache``.  A hit's content is checked against the set when the request
is allocated and from then on is that request's own: any later change that the
request did not write is a failure.  Content written under a different prefix or
salt, or never completely written, is never in the set.

The model is an over-approximation only in what a hit *may* return (any identical
chain's content); what a request reads after allocation is predicted exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import kvcore

__all__ = ["BS", "LAYERS", "WIDTH", "DifferentialFailure", "HypothesisChoices", "MapRec",
           "RandomChoices", "RefSeq", "Reference", "SPECIAL_BITS", "make_config"]

BS = 4
LAYERS = 2
HEADS = 2
DIM = 2
#: uint32 words per token row of K (or V).
WIDTH = HEADS * DIM
#: Odd float32 bit patterns mixed into the data: -0.0, +0.0, subnormals, quiet and
#: signalling NaNs with payloads, both infinities, the largest finite values.
SPECIAL_BITS = np.array([0x80000000, 0x00000000, 0x00000001, 0x807FFFFF, 0x00400000,
                         0x7FC00001, 0x7FA5A5A5, 0x7F800001, 0xFFFFFFFF, 0xFFC00000,
                         0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF], dtype=np.uint32)


def make_config(*, num_blocks: int = 40, swap_blocks: int = 12,
                hash_seed: int | None = 20240607) -> kvcore.CacheConfig:
    """Small shapes: the cost of a run is Python per operation, not bytes."""
    return kvcore.CacheConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                              dtype="float32", block_size=BS, num_blocks=num_blocks,
                              swap_blocks=swap_blocks, hash_seed=hash_seed)


class DifferentialFailure(AssertionError):
    """The manager disagreed with the reference (the message says where and how)."""


# --- where choices come from --------------------------------------------------------------


class RandomChoices:
    """Choices from a seeded PRNG: fast, for long runs."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""
        return self._r.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self._r.random() < p

    def pick(self, items: list[Any]) -> Any:
        return items[self._r.randrange(len(items))]

    def weighted(self, names: list[str], weights: list[float]) -> str:
        return self._r.choices(names, weights)[0]


class HypothesisChoices(RandomChoices):
    """Choices drawn from hypothesis' ``data``, so a failing run shrinks to a short
    sequence of small choices (``chance`` shrinks towards ``False``)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self._data = data
        self._st = st

    def int(self, lo: int, hi: int) -> int:
        return self._data.draw(self._st.integers(lo, hi))

    def chance(self, p: float) -> bool:
        return self._data.draw(self._st.integers(0, 99)) >= 100 - round(100 * p)

    def pick(self, items: list[Any]) -> Any:
        return items[self.int(0, len(items) - 1)]

    def weighted(self, names: list[str], weights: list[float]) -> str:
        # Shrinks towards the first name: put the cheapest operations first.
        total = sum(weights)
        x = self.int(0, 999) * total / 1000
        for name, w in zip(names, weights):
            if x < w:
                return name
            x -= w
        return names[-1]


# --- the reference ------------------------------------------------------------------------


@dataclass(eq=False)
class RefSeq:
    """One live (or ended) request as the reference sees it."""

    rid: str
    salt: str | None
    length: int
    #: Known token ids (a prefix of the sequence): ``token_ids()`` is them when they
    #: cover the whole length, else ``None``.
    tokens: list[int]
    handles: list[Any]
    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)
    written: list[int] = field(default_factory=lambda: [0] * LAYERS)
    alive: bool = True
    swapped: bool = False
    #: Documented slot moves since allocation (fork as parent, truncate, swap,
    #: deallocate, an observed copy-on-write): a mapping made before is stale.
    moves: int = 0
    cached: int = 0

    def __post_init__(self) -> None:
        if not self.k:
            self.k = [np.zeros((0, WIDTH), np.uint32) for _ in range(LAYERS)]
            self.v = [np.zeros((0, WIDTH), np.uint32) for _ in range(LAYERS)]
        self.ensure(self.length)

    def ensure(self, n: int) -> None:
        for layer in range(LAYERS):
            if self.k[layer].shape[0] < n:
                grow = max(n, 2 * self.k[layer].shape[0])
                for planes in (self.k, self.v):
                    new = np.zeros((grow, WIDTH), np.uint32)
                    new[:planes[layer].shape[0]] = planes[layer]
                    planes[layer] = new

    def token_ids(self) -> tuple[int, ...] | None:
        return tuple(self.tokens) if len(self.tokens) >= self.length else None

    def put(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        n = k.shape[0]
        self.ensure(start + n)
        self.k[layer][start:start + n] = k
        self.v[layer][start:start + n] = v
        self.written[layer] = max(self.written[layer], start + n)

    def copy_as(self, rid: str, handles: list[Any]) -> RefSeq:
        child = RefSeq(rid, self.salt, self.length, list(self.tokens), handles,
                       [a.copy() for a in self.k], [a.copy() for a in self.v],
                       list(self.written), cached=self.cached)
        return child


@dataclass(eq=False)
class MapRec:
    """A SlotMapping kept for deliberate reuse, with what it covered when made."""

    mapping: Any
    seqs: list[RefSeq]
    starts: list[int]
    ends: list[int]
    moves: list[int]
    foreign: bool = False

    def must_be_stale(self) -> bool:
        """Documented: refused when made by another manager, or when a sequence it
        covers moved its slots since (fork, truncate, swap, deallocation, a
        copy-on-write)."""
        return self.foreign or any(
            not s.alive or s.swapped or s.moves != m for s, m in zip(self.seqs, self.moves))


class Reference:
    """All live requests, the content a prefix hit may return, and the expected
    lifetime counters."""

    def __init__(self) -> None:
        self.live: dict[str, RefSeq] = {}
        #: (salt, chain token ids, layer) -> block contents (K bits + V bits) that a
        #: request with that chain held fully written.
        self.allowed: dict[tuple[Any, ...], set[bytes]] = {}
        self.failures = 0
        self.allocations = 0
        self.mappings: list[MapRec] = []

    def feed(self, seq: RefSeq, layer: int, lo: int, hi: int) -> None:
        """Record the content of ``seq``'s full blocks overlapping positions
        ``[lo, hi)`` of ``layer`` that are fully written and whose ids are known."""
        w, known = seq.written[layer], len(seq.tokens)
        for i in range(lo // BS, -(-hi // BS)):
            end = (i + 1) * BS
            if end > w or end > known or end > seq.length:
                continue
            key = (seq.salt, tuple(seq.tokens[:end]), layer)
            content = seq.k[layer][i * BS:end].tobytes() + seq.v[layer][i * BS:end].tobytes()
            self.allowed.setdefault(key, set()).add(content)

    def feed_all(self, seq: RefSeq) -> None:
        for layer in range(LAYERS):
            self.feed(seq, layer, 0, seq.length)

    def hit_is_allowed(self, seq: RefSeq, layer: int, block: int, k: np.ndarray,
                       v: np.ndarray) -> bool:
        end = (block + 1) * BS
        key = (seq.salt, tuple(seq.tokens[:end]), layer)
        content = k[block * BS:end].tobytes() + v[block * BS:end].tobytes()
        return content in self.allowed.get(key, ())

    def remember(self, rec: MapRec, keep: int = 40) -> None:
        self.mappings.append(rec)
        if len(self.mappings) > keep:
            del self.mappings[0]
