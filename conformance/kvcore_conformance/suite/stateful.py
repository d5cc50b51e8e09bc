"""The property-based stateful test: random operation sequences against a dense model.

A hypothesis ``RuleBasedStateMachine`` drives allocate / extend / extend_batch / write /
rewrite / fork / clone / deallocate / gc (eviction) / swap on a small pool (so pools
fill up, allocations are refused and cached blocks get evicted), and mirrors every
sequence in a dense numpy model.  After every step it checks that every live sequence
reads back exactly what the model holds, that the pool's invariants hold (no block
both free and in use, refcounts equal table holdings), and at the end that freeing
everything makes the pool whole again.

Sequences come in two kinds.  *Prompted* ones are allocated with token ids and always
written right away with K/V that are a fixed function of (layer, position, token), the
way a real model's K/V depend on the tokens: that is what makes prefix-cache hits
predictable, so the model knows what a hit must read.  *Plain* ones carry arbitrary
data, may leave layers partly unwritten, and get overwritten in place.
"""

# The lambdas handed to expect_raises / _refused are called at once, inside the
# loop iteration that built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvcore import AllocationRequest, Backend, Device, DType, PagedKvCacheHandle
from kvcore.errors import (InvalidHandleError, OutOfBlocksError, StaleSlotMappingError,
                           WriteOrderError)

from .._backends import require_device_type
from .._clauses import STATEFUL, check, check_equal, expect_raises
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle
from .manager import snapshot

__all__ = ["DEFAULT_RULES", "AdversarialRules", "KvCacheMachine", "SequenceRules",
           "StatefulContract", "SwapRules", "make_machine", "weaken_keys"]

#: Prompt token ids.  The third differs from the first in its first block only, so its
#: later blocks hold the same tokens at the same positions after a different prefix:
#: under weak keys they collide with the first's, and only exact chain verification
#: keeps them apart.
PREFIXES = (tuple(range(1000, 1024)), tuple(range(2000, 2024)),
            tuple(range(3000, 3004)) + tuple(range(1004, 1024)))
LAYERS, HEADS, DIM, BS, BLOCKS = 2, 1, 4, 4, 12


@dataclass
class SeqModel:
    """The dense reference of one sequence."""

    tokens: list[int]
    prompted: bool
    prefix: int = 0
    keys: list[np.ndarray] = field(default_factory=list)  # per layer, written rows
    values: list[np.ndarray] = field(default_factory=list)
    swapped: bool = False

    def copy(self) -> SeqModel:
        return SeqModel(list(self.tokens), self.prompted, self.prefix,
                        [k.copy() for k in self.keys], [v.copy() for v in self.values],
                        self.swapped)

    def complete(self) -> bool:
        return all(len(k) == len(self.tokens) for k in self.keys)


class KvCacheMachine(RuleBasedStateMachine):
    """The machine's state, helpers and checks; the rules come from mixins (below).

    :func:`make_machine` binds a backend, dtype, device and swap device as class
    attributes and adds the rule classes.  A rule class subclasses this one (for the
    helpers and state) and adds ``@rule`` methods; pass it in ``rules`` (or extend
    :attr:`StatefulContract.machine_rules`) to make it part of the random operations.
    """

    backend: ClassVar[Backend]
    dtype: ClassVar[DType]
    device: ClassVar[Device]
    swap_device: ClassVar[Device | None] = None
    #: Chain keys of a block's own tokens only (see :func:`weaken_keys`).
    weak_keys: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(self.backend, self.dtype, self.device, seed=7)
        extra: dict[str, Any] = {}
        if self.swap_device is not None:
            extra = {"swap_blocks": BLOCKS, "swap_device": self.swap_device}
        self.mgr = self.h.manager(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                                  block_size=BS, num_blocks=BLOCKS, **extra)
        self.models: dict[str, SeqModel] = {}
        self.handles: dict[str, list[PagedKvCacheHandle]] = {}
        self.dead: list[PagedKvCacheHandle] = []
        self.counter = 0
        #: Slot mappings of earlier steps, with their batches, for AdversarialRules.
        self.mappings: list[tuple[Any, list[str]]] = []
        if self.weak_keys:
            weaken_keys(self.mgr)

    # --- helpers ----------------------------------------------------------------

    def _rows(self, layer: int, kv: int, positions: range, tokens: list[int]) -> np.ndarray:
        """K or V of ``positions``, a fixed function of the layer, the position and the
        whole prefix up to it (as a model's are): a block served after another prefix
        reads wrong even where its own tokens agree."""
        prefix, acc = [], 0
        for t in tokens[:positions.stop]:
            acc = (acc * 1000003 + t + 1) & 0xFFFFF
            prefix.append(acc)
        keys = np.array([((layer * 2 + kv) << 40) | (p << 20) | prefix[p] for p in positions],
                        dtype=np.int64)
        return self.h.keyed(keys)

    def _write(self, rid: str, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        model = self.models[rid]
        self.h.write(self.mgr, rid, layer, k, v, start=start)
        model.keys[layer] = np.concatenate([model.keys[layer][:start], k,
                                            model.keys[layer][start + len(k):]])
        model.values[layer] = np.concatenate([model.values[layer][:start], v,
                                              model.values[layer][start + len(v):]])

    def _write_new(self, rid: str, layer: int, start: int) -> None:
        """Write positions ``[start, len)`` of ``layer`` with the kind's data."""
        model = self.models[rid]
        span = range(start, len(model.tokens))
        if not span:
            return
        if model.prompted:
            k, v = (self._rows(layer, 0, span, model.tokens),
                    self._rows(layer, 1, span, model.tokens))
        else:
            k, v = self.h.kv(len(span)), self.h.kv(len(span))
        self._write(rid, layer, start, k, v)

    def _pick(self, data: st.DataObject, *, swapped: bool | None = False,
              complete: bool = False, prompted: bool | None = None) -> str | None:
        ids = [rid for rid, m in self.models.items()
               if (swapped is None or m.swapped == swapped)
               and (not complete or m.complete())
               and (prompted is None or m.prompted == prompted)]
        return data.draw(st.sampled_from(ids), label="request") if ids else None

    def _remember(self, mapping: Any, batch: list[str]) -> None:
        self.mappings = [*self.mappings[-7:], (mapping, list(batch))]

    def _refused(self, call: Any) -> bool:
        """Run ``call``; on OutOfBlocksError check nothing changed and say so."""
        before = snapshot(self.mgr)
        try:
            call()
        except OutOfBlocksError:
            check_equal(snapshot(self.mgr), before, STATEFUL, "cache after a refused "
                        "operation (must be unchanged)")
            return True
        return False

    # --- checks -----------------------------------------------------------------

    @invariant()
    def everything_reads_back(self) -> None:
        settle(self.mgr)
        check_equal(sorted(hd.request_id for hd in self.mgr.list_handles()),
                    sorted(self.models), STATEFUL, "live request ids")
        for rid, model in self.models.items():
            for handle in self.handles[rid]:
                check(handle.is_valid(), STATEFUL, f"{rid!r}: a live handle is invalid")
                check_equal(handle.cache_id(), self.handles[rid][0].cache_id(), STATEFUL,
                            f"{rid!r}: clone cache_id")
            handle = self.handles[rid][-1]
            check_equal((handle.num_tokens(), handle.is_swapped()),
                        (len(model.tokens), model.swapped), STATEFUL,
                        f"{rid!r}: (num_tokens, is_swapped)")
            if model.swapped:
                continue
            for layer in range(LAYERS):
                check_equal(handle.num_written(layer), len(model.keys[layer]), STATEFUL,
                            f"{rid!r}: num_written({layer})")
                self.h.expect_kv(STATEFUL, handle, layer, model.keys[layer],
                                 model.values[layer], "dense reference")
        for handle in self.dead:
            check(not handle.is_valid(), STATEFUL,
                  f"a handle of deallocated {handle.request_id!r} is still valid")

    def teardown(self) -> None:
        for rid in list(self.models):
            self.mgr.deallocate(rid)
        self.mgr.gc()
        stats = settle(self.mgr)
        check_equal((stats.free_blocks, stats.used_blocks, stats.cached_blocks,
                     stats.swap_free_blocks),
                    (BLOCKS, 0, 0, BLOCKS if self.swap_device is not None else 0), STATEFUL,
                    "(free, used, cached, swap_free) blocks after freeing everything and gc")


class SequenceRules(KvCacheMachine):
    """allocate, extend, decode_batch, catch_up, rewrite, truncate, fork, clone,
    deallocate and gc."""

    # --- rules -----------------------------------------------------------------

    @rule(n=st.integers(0, 10), prefix=st.sampled_from([None, 0, 1, 2]))
    def allocate(self, n: int, prefix: int | None) -> None:
        rid = f"s{self.counter}"
        self.counter += 1
        if prefix is None:
            request = AllocationRequest(request_id=rid, num_tokens=n)
            tokens = [0] * n
        else:
            request = AllocationRequest(request_id=rid, prompt_token_ids=PREFIXES[prefix][:n])
            tokens = list(PREFIXES[prefix][:n])
        can = self.mgr.can_allocate(request)
        holder: list[PagedKvCacheHandle] = []
        if self._refused(lambda: holder.append(self.mgr.allocate(request))):
            check(not can, STATEFUL, "can_allocate said yes, allocate ran out of blocks")
            return
        check(can, STATEFUL, "can_allocate said no, allocate succeeded")
        handle = holder[0]
        model = SeqModel(tokens, prefix is not None, prefix or 0)
        cached = handle.num_cached_tokens()
        for layer in range(LAYERS):  # cached tokens already hold f(layer, pos, token)
            model.keys.append(self._rows(layer, 0, range(cached), tokens))
            model.values.append(self._rows(layer, 1, range(cached), tokens))
        self.models[rid], self.handles[rid] = model, [handle]
        for layer in range(LAYERS):
            self._write_new(rid, layer, cached)

    @rule(data=st.data(), n=st.integers(1, 6), follow=st.booleans(), write=st.booleans(),
          via_slots=st.booleans())
    def extend(self, data: st.DataObject, n: int, follow: bool, write: bool,
               via_slots: bool) -> None:
        rid = self._pick(data)
        if rid is None:
            return
        model = self.models[rid]
        start = len(model.tokens)
        if model.prompted and follow:  # continue the shared prefix where it goes on
            new = list(PREFIXES[model.prefix][start:start + n])
            new += [3000 + i for i in range(n - len(new))]
        else:
            new = [data.draw(st.integers(5000, 5003)) for _ in range(n)]
        out: list[Any] = []
        if self._refused(lambda: out.append(self.mgr.extend(rid, n, token_ids=new))):
            return
        model.tokens.extend(new)
        if not (model.prompted or write):
            return  # plain sequences may leave the new tokens unwritten for now
        if via_slots and all(len(k) == start for k in model.keys):
            for layer in range(LAYERS):
                span = range(start, start + n)
                if model.prompted:
                    k, v = (self._rows(layer, 0, span, model.tokens),
                            self._rows(layer, 1, span, model.tokens))
                else:
                    k, v = self.h.kv(n), self.h.kv(n)
                self.mgr.write_slots(layer, out[0], self.h.native(k), self.h.native(v))
                model.keys[layer] = np.concatenate([model.keys[layer], k])
                model.values[layer] = np.concatenate([model.values[layer], v])
            self._remember(out[0], [rid])
        else:
            for layer in range(LAYERS):
                if model.prompted:  # fresh private slots: no copy-on-write needed
                    self._write_new(rid, layer, len(model.keys[layer]))
                else:  # an earlier unwritten tail may sit in a shared block
                    self._refused(lambda: self._write_new(rid, layer,
                                                          len(model.keys[layer])))

    @rule(data=st.data(), n=st.integers(1, 2))
    def decode_batch(self, data: st.DataObject, n: int) -> None:
        ids = [rid for rid, m in self.models.items() if not m.swapped and m.complete()]
        if not ids:
            return
        batch = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3,
                                   unique=True), label="batch")
        tokens = [[5000 + len(self.models[r].tokens) % 3] * n for r in batch]
        out: list[Any] = []
        if self._refused(lambda: out.append(self.mgr.extend_batch(batch, n,
                                                                  token_ids=tokens))):
            return
        for rid, new in zip(batch, tokens):
            self.models[rid].tokens.extend(new)
        for layer in range(LAYERS):
            ks, vs = [], []
            for rid in batch:
                model = self.models[rid]
                span = range(len(model.tokens) - n, len(model.tokens))
                if model.prompted:
                    k, v = (self._rows(layer, 0, span, model.tokens),
                            self._rows(layer, 1, span, model.tokens))
                else:
                    k, v = self.h.kv(n), self.h.kv(n)
                ks.append(k)
                vs.append(v)
                model.keys[layer] = np.concatenate([model.keys[layer], k])
                model.values[layer] = np.concatenate([model.values[layer], v])
            self.mgr.write_slots(layer, out[0], self.h.native(np.concatenate(ks)),
                                 self.h.native(np.concatenate(vs)))
        self._remember(out[0], batch)

    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def catch_up(self, data: st.DataObject, layer: int) -> None:
        rid = self._pick(data, prompted=False)
        if rid is not None:  # may copy a shared block first, so may run out of blocks
            self._refused(lambda: self._write_new(rid, layer,
                                                  len(self.models[rid].keys[layer])))

    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def rewrite(self, data: st.DataObject, layer: int) -> None:
        rid = self._pick(data, prompted=False)
        if rid is None or not len(self.models[rid].keys[layer]):
            return
        model = self.models[rid]
        start = data.draw(st.integers(0, len(model.keys[layer]) - 1), label="start")
        m = data.draw(st.integers(1, len(model.tokens) - start), label="count")
        k, v = self.h.kv(m), self.h.kv(m)
        # Overwriting shared blocks copies them first, which may need free blocks.
        self._refused(lambda: self._write(rid, layer, start, k, v))

    @rule(data=st.data(), keep=st.integers(0, 12))
    def truncate(self, data: st.DataObject, keep: int) -> None:
        rid = self._pick(data)
        if rid is None:
            return
        model = self.models[rid]
        n = min(keep, len(model.tokens))
        # A shared or prefix-cached last block is copied first: may need a free block.
        if self._refused(lambda: self.mgr.truncate(rid, n)):
            return
        del model.tokens[n:]
        model.keys = [k[:n] for k in model.keys]
        model.values = [v[:n] for v in model.values]

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        rid = self._pick(data)
        if rid is None:
            return
        child = f"s{self.counter}"
        self.counter += 1
        handle = self.mgr.fork(self.handles[rid][0], child)
        self.models[child], self.handles[child] = self.models[rid].copy(), [handle]

    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        rid = self._pick(data, swapped=None)
        if rid is not None:
            self.handles[rid].append(self.handles[rid][-1].clone_handle())

    @rule(data=st.data(), by_id=st.booleans())
    def deallocate(self, data: st.DataObject, by_id: bool) -> None:
        rid = self._pick(data, swapped=None)
        if rid is None:
            return
        self.mgr.deallocate(rid if by_id else self.handles[rid][0])
        del self.models[rid]
        self.dead.extend(self.handles.pop(rid))

    @rule()
    def gc(self) -> None:
        self.mgr.gc()


class SwapRules(KvCacheMachine):
    """swap_out and swap_in (only when the machine has a swap device)."""

    @precondition(lambda self: self.swap_device is not None)
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        rid = self._pick(data)
        if rid is not None and not self._refused(lambda: self.mgr.swap_out(rid)):
            self.models[rid].swapped = True

    @precondition(lambda self: self.swap_device is not None)
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        rid = self._pick(data, swapped=True)
        if rid is not None and not self._refused(lambda: self.mgr.swap_in(rid)):
            self.models[rid].swapped = False


class AdversarialRules(KvCacheMachine):
    """What an adversary (or a buggy engine) does: write through slot mappings of earlier
    steps, after forks, copy-on-write, truncation, swaps and deallocation have moved
    things; write through another manager's mapping; and, with every chain key weakened
    to a block's own tokens, allocate prompts whose blocks collide with other
    prefixes'.  Each reused mapping is either refused with a typed error, leaving
    everything as it was, or accepted only for sequences it may still write, which the
    dense reference then follows; nothing else may change."""

    weak_keys = True

    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def reuse_an_old_mapping(self, data: st.DataObject, layer: int) -> None:
        if not self.mappings:
            return
        mapping, batch = data.draw(st.sampled_from(self.mappings), label="old mapping")
        ks, vs = [], []
        for i, rid in enumerate(batch):
            start, end = int(mapping.starts[i]), int(mapping.ends[i])
            model = self.models.get(rid)
            if model is not None and model.prompted and end <= len(model.tokens):
                # A prompted sequence's K/V are a function of its tokens: write exactly
                # those, so an accepted rewrite changes nothing a prefix hit could see.
                ks.append(self._rows(layer, 0, range(start, end), model.tokens))
                vs.append(self._rows(layer, 1, range(start, end), model.tokens))
            else:
                ks.append(self.h.kv(end - start))
                vs.append(self.h.kv(end - start))
        before = snapshot(self.mgr)
        try:
            self.mgr.write_slots(layer, mapping, self.h.native(np.concatenate(ks)),
                                 self.h.native(np.concatenate(vs)))
        except (StaleSlotMappingError, WriteOrderError):
            check_equal(snapshot(self.mgr), before, STATEFUL,
                        "cache after a refused write through an old mapping")
            return
        for i, rid in enumerate(batch):  # accepted: every sequence must still be writable
            start, end = int(mapping.starts[i]), int(mapping.ends[i])
            model = self.models.get(rid)
            check(model is not None and not model.swapped, STATEFUL,
                  f"an old mapping wrote for {rid!r}, which is deallocated or swapped out")
            assert model is not None
            check(end <= len(model.tokens) and start <= len(model.keys[layer]), STATEFUL,
                  f"an old mapping wrote positions [{start}, {end}) of {rid!r}, which holds "
                  f"{len(model.tokens)} tokens, {len(model.keys[layer])} written at "
                  f"layer {layer}")
            model.keys[layer] = np.concatenate([model.keys[layer][:start], ks[i],
                                                model.keys[layer][end:]])
            model.values[layer] = np.concatenate([model.values[layer][:start], vs[i],
                                                  model.values[layer][end:]])

    @rule(n=st.integers(1, 3), layer=st.integers(0, LAYERS - 1))
    def write_through_another_managers_mapping(self, n: int, layer: int) -> None:
        other = self.h.manager(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                               block_size=BS, num_blocks=2)
        try:
            handle = other.allocate(AllocationRequest(request_id="foreign", num_tokens=0))
            mapping = other.extend_batch([handle], n)
            before = snapshot(self.mgr)
            expect_raises(STATEFUL, StaleSlotMappingError,
                          lambda: self.mgr.write_slots(layer, mapping,
                                                       self.h.native(self.h.kv(n)),
                                                       self.h.native(self.h.kv(n))),
                          "write_slots with another manager's mapping")
            expect_raises(STATEFUL, InvalidHandleError, lambda: self.mgr.extend(handle, 1),
                          "extend of another manager's handle")
            check_equal(snapshot(self.mgr), before, STATEFUL,
                        "cache after refusing another manager's mapping and handle")
        finally:
            other.close()


def weaken_keys(mgr: Any) -> None:
    """Give ``mgr`` chain keys that depend on a block's own token ids only, so blocks
    with equal tokens after different prefixes share a key (what a crafted collision
    achieves against a real key).  Reaches into the manager on purpose: it is the one
    way to force collisions through the public API's behaviour."""
    hasher = mgr._co.hasher
    weights = np.arange(1, BS + 1, dtype=np.uint64)

    def own_tokens(blocks: np.ndarray, *_: Any) -> np.ndarray:
        return blocks.astype(np.uint64) @ weights

    hasher.keys = lambda blocks, parent: own_tokens(blocks)
    hasher.step = lambda parents, blocks: own_tokens(blocks)


#: The rules every stateful run uses.
DEFAULT_RULES: tuple[type[KvCacheMachine], ...] = (SequenceRules, SwapRules, AdversarialRules)


def make_machine(backend: Backend, dtype: DType, device: Device, swap_device: Device | None,
                 rules: Sequence[type[KvCacheMachine]] = DEFAULT_RULES) -> type[KvCacheMachine]:
    """The state machine class for one backend, dtype, device and swap device, made of
    the given rule classes."""
    name = f"KvCacheMachine_{backend.name}_{dtype.value}_{device.type}"
    attrs = {"backend": backend, "dtype": dtype, "device": device, "swap_device": swap_device,
             "__qualname__": name}
    return type(name, (*rules, KvCacheMachine), attrs)


class StatefulContract(ContractTests):
    """The stateful property test, per declared dtype and device.

    ``machine_rules`` are the rule classes the machine is made of (see
    :class:`KvCacheMachine`); a subclass adds its own by extending the tuple.
    """

    machine_rules: ClassVar[tuple[type[KvCacheMachine], ...]] = DEFAULT_RULES

    @covers(STATEFUL)
    def test_random_operations_match_a_dense_reference(
            self, kvcore_backend: Backend, kvcore_dtype: DType, kvcore_device: Device,
            kvcore_hypothesis_settings: Any) -> None:
        swap_types = kvcore_backend.capabilities().swap_device_types
        swap = Device.parse(swap_types[0]) if swap_types else None
        machine = make_machine(kvcore_backend, kvcore_dtype, kvcore_device, swap,
                               self.machine_rules)
        run_state_machine_as_test(machine, settings=kvcore_hypothesis_settings)

    @covers(STATEFUL)
    def test_random_operations_without_swap(self, kvcore_backend: Backend,
                                            kvcore_default_dtype: DType,
                                            kvcore_default_device: Device,
                                            kvcore_hypothesis_settings: Any) -> None:
        require_device_type(kvcore_backend, kvcore_default_device.type)
        machine = make_machine(kvcore_backend, kvcore_default_dtype, kvcore_default_device, None,
                               self.machine_rules)
        run_state_machine_as_test(machine, settings=kvcore_hypothesis_settings)
