"""The driver of the differential test: random operations through kvcore's public API,
each checked against the dense reference of :mod:`tests._diff_model`.

After every operation: ``check_invariants()``, the lifetime counters, the metadata and
public reads of the requests it touched, and every resident request's K/V through
``layer_pool`` + ``block_table``, all bit for bit.  Every refusal must be the
documented error type and must leave the observable state (:mod:`tests._observe`)
exactly as it was, ``allocation_failures`` counting each ``OutOfBlocksError``.
"""

from __future__ import annotations

import traceback
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from kvcore import KvCacheManager

from ._diff_model import (BS, LAYERS, SPECIAL_BITS, WIDTH, DifferentialFailure, RandomChoices,
                          RefSeq, Reference, make_config)
from ._diff_ops import OPS
from ._observe import bits, describe_difference, observe

__all__ = ["Driver", "run_differential"]

#: A prompt's first token from here on is never in the vocabulary: a chain nobody shares.
_FRESH = 1_000_000


class Driver:
    """One manager under test (plus a second, ``other``, whose mappings and handles must
    be refused), the reference, and the operations in :mod:`tests._diff_ops`."""

    def __init__(self, backend: str, choices: RandomChoices, data_seed: int, *,
                 config: Any = None, exact_hits: bool = True) -> None:
        self.backend = backend
        #: Whether a chain nobody else has is always served in full (false when a test
        #: forces keys to collide: a collision may cost a hit, never data).
        self.exact_hits = exact_hits
        self.cfg = config or make_config()
        self.mgr = KvCacheManager(self.cfg, backend)
        self.other = KvCacheManager(self.cfg, backend)
        self.c = choices
        self.data = np.random.default_rng(data_seed)
        self.ref = Reference()
        self.dead: list[tuple[Any, RefSeq, str]] = []
        self.other_handles: list[Any] = []
        self.log: deque[str] = deque(maxlen=40)
        self.counts: Counter[str] = Counter()
        self.op_index = 0
        self._ids = 0
        self._fresh = _FRESH
        self.cow = 0
        self._snap: dict[str, Any] | None = None
        #: The last decode step's requests and the very handles it passed.
        self.last_step: tuple[list[RefSeq], list[Any]] | None = None
        # Blocks of 4 tokens that prompts and decoded tokens are built from: shared
        # prefixes, and variants differing only in a block's last token.
        base = [[1, 2, 3, 4], [5, 6, 7, 8], [0, 9, 2**31 - 1, 7], [4, 3, 2, 1]]
        self.vocab = base + [b[:-1] + [b[-1] + 1000] for b in base]
        self._torch = backend == "torch"

    # --- failures and refusals ------------------------------------------------------

    def fail(self, message: str) -> DifferentialFailure:
        recent = "\n  ".join(self.log)
        return DifferentialFailure(f"[{self.backend}] operation #{self.op_index}: {message}\n"
                                   f"recent operations:\n  {recent}")

    def note(self, text: str) -> None:
        self.log.append(f"#{self.op_index} {text}")

    def snapshot(self) -> dict[str, Any]:
        """The observable state before a call that may be refused.  A refusal's "after"
        snapshot (proven equal) stands for the next "before" until something changes."""
        if self._snap is None:
            self._snap = observe(self.mgr, kv=False)
        return self._snap

    def changed(self) -> None:
        """Something changed the manager outside :meth:`attempt`."""
        self._snap = None

    def attempt(self, what: str, fn: Callable[[], Any],
                refusals: dict[type[BaseException], int]) -> tuple[bool, Any]:
        """Run ``fn``; a refusal of one of the given exact types (with the number of
        allocation failures it must count) must change nothing.  Returns
        ``(True, result)`` or ``(False, exception)``."""
        # A call predicted to succeed needs no "before": any refusal fails the run.
        before = self.snapshot() if refusals else None
        self._snap = None
        try:
            return True, fn()
        except Exception as exc:  # noqa: BLE001 - every exception is judged below
            kind = type(exc)
            if kind not in refusals:
                raise self.fail(f"{what} raised {kind.__name__}: {exc}; documented here: "
                                f"{sorted(k.__name__ for k in refusals) or 'success'}\n"
                                f"{traceback.format_exc()}") from exc
            after = observe(self.mgr, kv=False)
            assert before is not None
            diff = describe_difference(before, after, failures_added=refusals[kind])
            if diff:
                raise self.fail(f"{what} was refused with {kind.__name__} ({exc}) but "
                                f"changed state: {diff}") from exc
            self._snap = after
            self.ref.failures += refusals[kind]
            self.counts[f"refused:{kind.__name__}"] += 1
            self.note(f"  -> refused {kind.__name__}")
            return False, exc

    def refuse(self, what: str, fn: Callable[[], Any], kind: type[BaseException],
               failures: int = 0) -> BaseException:
        ok, out = self.attempt(what, fn, {kind: failures})
        if ok:
            raise self.fail(f"{what} succeeded; expected {kind.__name__}")
        return out

    # --- data -----------------------------------------------------------------------

    def fresh(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V bits for ``n`` tokens: random words with odd patterns mixed in."""
        words = self.data.integers(0, 2**32, size=(2, n, WIDTH), dtype=np.uint64)
        words = words.astype(np.uint32)
        mask = self.data.random((2, n, WIDTH)) < 0.3
        words[mask] = self.data.choice(SPECIAL_BITS, int(mask.sum()))
        return words[0], words[1]

    def native(self, words: np.ndarray) -> Any:
        """Bits as a ``[n, heads, dim]`` float32 array of the backend's library (now and
        then a numpy array into torch, through DLPack)."""
        a = words.view(np.float32).reshape(words.shape[0], self.cfg.num_kv_heads,
                                           self.cfg.head_dim).copy()
        if self._torch and not self.c.chance(0.1):
            import torch
            return torch.from_numpy(a)
        return a

    def new_rid(self) -> str:
        dead = [s.rid for _, s, _ in self.dead if s.rid not in self.ref.live]
        if dead and self.c.chance(0.1):
            return self.c.pick(dead)  # a new cache under a dead request's id
        self._ids += 1
        return f"r{self._ids}"

    def fresh_token(self) -> int:
        self._fresh += 1
        return self._fresh

    def prompt(self) -> list[int]:
        tokens: list[int] = []
        for _ in range(self.c.pick([0, 1, 1, 2, 2, 3])):
            # Mostly the same few blocks, so that prefixes are shared (and differ in
            # the last token of a block: the variants).
            tokens += self.vocab[0 if self.c.chance(0.4) else self.c.int(0, 3)
                                 if self.c.chance(0.6) else self.c.int(0, len(self.vocab) - 1)]
        tail = self.c.int(0, BS)
        if tail:
            block = self.c.pick(self.vocab)
            tokens += block[:tail] if self.c.chance(0.5) else \
                [self.c.int(0, 40) for _ in range(tail)]
        return tokens

    def continuation(self, seq: RefSeq, n: int) -> list[int]:
        if self.c.chance(0.5):
            block = self.c.pick(self.vocab)
            return [block[(seq.length + i) % BS] for i in range(n)]
        return [self.c.int(0, 40) for _ in range(n)]

    # --- handles --------------------------------------------------------------------

    def handle(self, seq: RefSeq, *, allow_id: bool = True) -> Any:
        """A way to name ``seq``: one of its handles, or its request id."""
        if allow_id and self.c.chance(0.2):
            return seq.rid
        return self.c.pick(seq.handles)

    def resident(self) -> list[RefSeq]:
        return [s for s in self.ref.live.values() if not s.swapped]

    def tables(self) -> dict[str, np.ndarray]:
        """Every resident request's physical blocks, from one public page-table call."""
        seqs = self.resident()
        if not seqs:
            return {}
        batch = self.mgr.vllm_block_table([s.handles[0] for s in seqs], pad_value=-1)
        return {s.rid: row[:-(-int(n) // BS)].astype(np.int64)
                for s, row, n in zip(seqs, batch.block_tables, batch.seq_lens)}

    def sharers(self, seq: RefSeq, tables: dict[str, np.ndarray]) -> set[int]:
        """Physical blocks ``seq`` holds that another resident table also holds (the
        refcount is the number of tables holding a block)."""
        others = [t for rid, t in tables.items() if rid != seq.rid]
        if not others:
            return set()
        return set(np.intersect1d(tables[seq.rid], np.concatenate(others)).tolist())

    def room(self) -> int:
        """Blocks an allocation may take: empty plus evictable cached ones."""
        st = self.mgr.stats()
        return st.free_blocks + st.cached_blocks

    def cow_delta(self) -> int:
        now = self.mgr.stats().copy_on_write_copies
        delta, self.cow = now - self.cow, now
        return delta

    # --- checks after every operation -----------------------------------------------

    def read_layer(self, seq: RefSeq, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        h = self.handle(seq, allow_id=False)
        how = self.c.int(0, 2)
        if how == 0:
            pair = h.kv_cache(layer)
            if pair is None:
                return None
            k, v = pair
        else:
            k, v = h.key_cache(layer), h.value_cache(layer)
            if (k is None) != (v is None):
                raise self.fail(f"{seq.rid}: key_cache and value_cache of layer {layer} "
                                "disagree on whether anything is written")
            if k is None:
                return None
        shape = (seq.written[layer], self.cfg.num_kv_heads, self.cfg.head_dim)
        if tuple(k.shape) != shape or tuple(v.shape) != shape:
            raise self.fail(f"{seq.rid} layer {layer}: read shapes {k.shape}/{v.shape}, "
                            f"expected {shape}")
        return bits(k).reshape(-1, WIDTH), bits(v).reshape(-1, WIDTH)

    def verify_reads(self, seq: RefSeq) -> None:
        if seq.swapped:
            return
        for layer in range(LAYERS):
            got = self.read_layer(seq, layer)
            w = seq.written[layer]
            if got is None:
                if w:
                    raise self.fail(f"{seq.rid} layer {layer}: read None, {w} tokens written")
                continue
            for plane, want, have in (("K", seq.k[layer][:w], got[0]),
                                      ("V", seq.v[layer][:w], got[1])):
                if not np.array_equal(want, have):
                    bad = int(np.argmax((want != have).any(axis=1)))
                    raise self.fail(f"{seq.rid} layer {layer}: {plane} differs at position "
                                    f"{bad}: read {have[bad].tolist()}, wrote "
                                    f"{want[bad].tolist()}")

    def verify_meta(self, seq: RefSeq) -> None:
        h = self.handle(seq, allow_id=False)
        table = h.block_table()
        got = (h.is_valid(), h.num_tokens(), table.sequence_length, table.num_blocks,
               h.is_swapped(), h.token_ids(), h.num_cached_tokens(),
               tuple(h.num_written(layer) for layer in range(LAYERS)))
        want = (True, seq.length, seq.length, -(-seq.length // BS), seq.swapped,
                seq.token_ids(), seq.cached, tuple(seq.written))
        if got != want:
            raise self.fail(f"{seq.rid}: (valid, tokens, table length, blocks, swapped, "
                            f"token_ids, cached, written) is {got}, expected {want}")

    def verify_pools(self) -> None:
        """Every resident request's K/V straight from the layer pools through its
        public block table (what an attention kernel reads)."""
        seqs = self.resident()
        if not seqs:
            return
        nb = self.cfg.num_blocks
        batch = self.mgr.vllm_block_table([s.handles[0] for s in seqs], pad_value=-1)
        table = batch.block_tables.astype(np.int64)
        pos = np.arange(table.shape[1] * BS)
        slots = table[:, pos // BS] * BS + pos % BS
        for layer in range(LAYERS):
            pool = bits(self.mgr.layer_pool(layer)).reshape(2, nb * BS, WIDTH)
            written = np.array([s.written[layer] for s in seqs])
            mine = slots[pos[None, :] < written[:, None]]
            for plane, got, want in (("K", pool[0, mine], [s.k[layer][:s.written[layer]]
                                                           for s in seqs]),
                                     ("V", pool[1, mine], [s.v[layer][:s.written[layer]]
                                                           for s in seqs])):
                want = np.concatenate(want)
                if not np.array_equal(got, want):
                    bad = int(np.argmax((got != want).any(axis=1)))
                    who = int(np.searchsorted(np.cumsum(written), bad, side="right"))
                    raise self.fail(f"{seqs[who].rid} layer {layer}: the {plane} its block "
                                    "table points at in the pool differ from what it wrote")

    def check(self, touched: list[RefSeq]) -> None:
        self.mgr.check_invariants()
        st = self.mgr.stats()
        got = (st.allocation_failures, st.allocations, st.active_caches + st.swapped_caches,
               st.swapped_caches)
        want = (self.ref.failures, self.ref.allocations, len(self.ref.live),
                sum(s.swapped for s in self.ref.live.values()))
        if got != want:
            raise self.fail(f"(allocation_failures, allocations, caches, swapped) is {got}, "
                            f"expected {want}")
        if sorted(h.request_id for h in self.mgr.list_handles()) != sorted(self.ref.live):
            raise self.fail("list_handles() disagrees with the live requests")
        everyone = self.op_index % 64 == 0
        for seq in (self.ref.live.values() if everyone else touched):
            if seq.alive:
                self.verify_meta(seq)
                self.verify_reads(seq)
        self.verify_pools()

    # --- running --------------------------------------------------------------------

    def step(self) -> None:
        live = len(self.ref.live)
        names = list(OPS)
        weights = [w(live) if callable(w) else w for _, w in OPS.values()]
        name = self.c.weighted(names, weights)
        self.op_index += 1
        self.note(name)
        self.cow = self.mgr.stats().copy_on_write_copies
        self._snap = None
        touched = OPS[name][0](self) or []
        self.counts[name] += 1
        self.check(touched)

    def close(self) -> None:
        self.mgr.close()
        self.other.close()


def run_differential(backend: str, seed: int, operations: int, *,
                     choices: RandomChoices | None = None,
                     exact_hits: bool = True) -> Counter[str]:
    """``operations`` random operations on a fresh manager of ``backend`` (choices from
    ``seed`` unless given, K/V bits always from ``seed``); raises
    :class:`DifferentialFailure` at the first disagreement.  Returns what ran."""
    driver = Driver(backend, choices or RandomChoices(seed), data_seed=seed,
                    exact_hits=exact_hits)
    try:
        for _ in range(operations):
            driver.step()
        for seq in list(driver.ref.live.values()):
            driver.verify_meta(seq)
            driver.verify_reads(seq)
        st = driver.mgr.stats()
        driver.counts.update({"operations": driver.op_index, "evictions": st.evictions,
                              "copy-on-write copies": st.copy_on_write_copies})
        return driver.counts
    finally:
        driver.close()
