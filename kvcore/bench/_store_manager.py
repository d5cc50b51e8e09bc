"""The store figures measured through a manager that owns a StoreConnector
(``CacheConfig(store=URL, hash_key=...)``).

* ``decode_step_with_store``: one decode step (``extend_batch`` + ``write_slots`` per
  layer) of ``batch`` sequences with a store attached, against the same step without
  one, interleaved step by step.  The figure averages over a whole number
  of blocks: every ``block_size`` steps each sequence completes a block, whose K/V
  the manager offers, so a plain median step would hide the cost being measured: per
  step position of the cycle, the median over cycles, averaged over the cycle.
  ``details`` keep the plain medians, the worst step and the time spent on the engine's
  thread offering blocks.  Target: at most 1.1x.
* ``load_prefix_via_allocate``: ``allocate`` of a ``max_prompt``-token prompt that a
  first manager wrote and closed (so it is in the store and nowhere else: one round
  trip, every value checked, copied into fresh blocks), against allocating the same
  prompt in a manager without a store and writing its K/V.  Both managers' pools are
  touched first.
* ``hit_latency_via_allocate``: ``allocate`` of a prompt one full block (plus one
  token) long whose block is in the store, against ``fetch_run`` of that one block by
  the connector alone: what the manager adds to a one-block hit.
* ``store_hit_per_block``: ``load_prefix_via_allocate`` divided by its blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import Backend
from .._device import DType
from .._manager import KvCacheManager
from ..models import AllocationRequest, CacheConfig
from ._arrays import BenchArrays
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import clock, median

__all__ = ["INTEGRATION_FIELDS", "measure_with_manager"]

#: The CacheConfig fields the manager integration adds.
INTEGRATION_FIELDS = ("store", "hash_key")


def measure_with_manager(result: WorkloadResult, backend: Backend, p: BenchParams,
                         url: str) -> None:
    """Add the figures above to ``result``."""
    hash_key = np.random.default_rng(p.seed).bytes(32)
    dtype = DType.parse(p.dtype)
    device = backend.default_device()
    arrays = BenchArrays(backend, dtype, device, seed=p.seed)
    # Whole blocks of steps, at least two, so every sequence completes as many blocks.
    steps = max(2, -(-p.decode_steps // p.block_size)) * p.block_size
    blocks = p.batch * (-(-(p.prompt + steps) // p.block_size)) + 1
    base = dict(num_layers=p.layers, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                dtype=dtype, block_size=p.block_size, device=device, num_blocks=blocks)
    # A namespace of this run's own: nothing another run left can be served.
    stored_cfg = dict(base, store=url, hash_key=hash_key,
                      store_namespace=f"bench-{np.random.default_rng().integers(1 << 40):x}")
    plain = KvCacheManager(CacheConfig(**base), backend=backend)
    stored = KvCacheManager(CacheConfig(**stored_cfg), backend=backend)
    try:
        _decode(result, plain, stored, arrays, p, steps)
    finally:
        stored.close()
        plain.close()
    load_base = dict(stored_cfg, num_blocks=2 * (-(-p.max_prompt // p.block_size)) + 2)
    _load(result, backend, load_base, arrays, p)


def _prompt(seed: int, length: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng(seed).integers(0, 32000, length).tolist())


def _decode(result: WorkloadResult, plain: KvCacheManager, stored: KvCacheManager,
            arrays: BenchArrays, p: BenchParams, steps: int) -> None:
    k = arrays.random(p.batch, p.kv_heads, p.head_dim)
    v = arrays.random(p.batch, p.kv_heads, p.head_dim)
    handles = {}
    for name, mgr in (("plain", plain), ("stored", stored)):
        _touch(mgr, arrays, p, mgr.config.max_tokens)
        handles[name] = [mgr.allocate(AllocationRequest(
            request_id=f"{name}-{b}", prompt_token_ids=_prompt(100 + b, p.prompt)))
            for b in range(p.batch)]
        pk = arrays.random(p.batch * p.prompt, p.kv_heads, p.head_dim)
        for h_index, h in enumerate(handles[name]):
            for layer in range(p.layers):
                rows = slice(h_index * p.prompt, (h_index + 1) * p.prompt)
                mgr.write(h, layer, pk[rows], pk[rows])
    stored.flush_store(60)  # the prompts' blocks are sent before the steps are timed
    hook = _HookTimer(stored)
    offered = stored.store_stats().blocks_offered  # type: ignore[union-attr]
    rng = np.random.default_rng(p.seed)
    times: dict[str, list[float]] = {"plain": [], "stored": []}
    for _ in range(steps):
        ids = rng.integers(0, 32000, (p.batch, 1)).tolist()  # token ids: blocks get keys
        for name, mgr in (("plain", plain), ("stored", stored)):
            t0 = clock()
            mapping = mgr.extend_batch(handles[name], 1, token_ids=ids)
            for layer in range(p.layers):
                mgr.write_slots(layer, mapping, k, v)
            arrays.sync()
            times[name].append(clock() - t0)
    # The last step's books (and its completed blocks' offers) settle in the next
    # call: one more, timed into the last step, so every completion is counted.
    for name, mgr in (("plain", plain), ("stored", stored)):
        t0 = clock()
        mgr.stats()
        times[name][-1] += clock() - t0
    hook.stop()
    connector = stored.store_stats()
    bs = p.block_size
    # Every sequence completes a block at the same step of each cycle of block_size
    # steps (the prompts are whole blocks): per position in the cycle, the median over
    # cycles (robust to a stray slow step), averaged over the positions (so the step
    # that offers the completed blocks weighs what it costs).
    value, baseline = (float(np.mean([median(times[name][i::bs]) for i in range(bs)]))
                       for name in ("stored", "plain"))
    result.add(Figure(name="decode_step_with_store", value=value, unit="s", baseline=baseline,
                      baseline_label="the same decode step without a store (per step of a "
                                     f"{bs}-step cycle the median over {steps // bs} cycles, "
                                     "averaged over the cycle; each sequence completes and "
                                     "offers one block per cycle)",
                      ratio=value / baseline, ratio_meaning="with / without (lower is better)",
                      target="<= 1.1x", met=value / baseline <= 1.1))
    result.details["decode_step_with_store"] = {
        "median_with_s": median(times["stored"]), "median_without_s": median(times["plain"]),
        "worst_with_s": max(times["stored"]), "worst_without_s": max(times["plain"]),
        # Blocks the steps completed and queued (one per sequence per cycle), and the
        # connector's drops so far (queue full, store failing).
        "blocks_offered": connector.blocks_offered - offered,  # type: ignore[union-attr]
        "dropped_writes": connector.dropped_writes,  # type: ignore[union-attr]
        # On the engine's thread: copying completed blocks to the host and queueing
        # them; the rest of the difference is the writer thread and the store server
        # competing for the same cores.
        "offer_on_engine_thread_per_step_s": hook.total / steps}


class _HookTimer:
    """Times the manager's block-completion hook (gather to host + offer) while the
    steps run: the share of the overhead paid on the engine's own thread."""

    def __init__(self, mgr: KvCacheManager) -> None:
        self.total = 0.0
        self._link = mgr._link  # noqa: SLF001 - the bench looks inside on purpose
        inner = self._link.completed  # type: ignore[union-attr]

        def completed(group: Any, blocks: Any) -> None:
            t0 = clock()
            inner(group, blocks)
            self.total += clock() - t0

        self._link.completed = completed  # type: ignore[union-attr, method-assign]

    def stop(self) -> None:
        del self._link.completed  # type: ignore[union-attr]


def _touch(mgr: KvCacheManager, arrays: BenchArrays, p: BenchParams, tokens: int) -> None:
    """Write the first ``tokens`` tokens' blocks once (fresh memory is slow on first
    touch), then give them back empty (no token ids: nothing is cached or offered);
    the next allocations take the same blocks."""
    h = mgr.allocate(AllocationRequest(request_id="touch", num_tokens=tokens))
    kv = arrays.random(tokens, p.kv_heads, p.head_dim)
    for layer in range(p.layers):
        mgr.write(h, layer, kv, kv)
    arrays.sync()
    mgr.deallocate(h)


def _load(result: WorkloadResult, backend: Backend, base: dict[str, Any],
          arrays: BenchArrays, p: BenchParams) -> None:
    prompt = _prompt(7, p.max_prompt)
    blocks = (p.max_prompt - 1) // p.block_size  # the last prompt token is computed
    kv = arrays.random(p.max_prompt, p.kv_heads, p.head_dim)
    one = _prompt(8, p.block_size + 1)
    writer = KvCacheManager(CacheConfig(**base), backend=backend)
    try:
        for rid, tokens in (("w", prompt), ("w1", one)):
            h = writer.allocate(AllocationRequest(request_id=rid, prompt_token_ids=tokens))
            for layer in range(p.layers):
                writer.write(h, layer, kv[:len(tokens)], kv[:len(tokens)])
        writer.flush_store(120)
        one_key = writer.block_digests("w1")[:1]
    finally:
        writer.close()
    plain = {k: v for k, v in base.items() if k not in ("store", "hash_key", "store_namespace")}
    load_s, write_s, served = [], [], 0
    for rep in range(p.repeats + 1):
        reader = KvCacheManager(CacheConfig(**base), backend=backend)
        fresh = KvCacheManager(CacheConfig(**plain), backend=backend)
        try:
            _touch(reader, arrays, p, p.max_prompt)
            _touch(fresh, arrays, p, p.max_prompt)
            t0 = clock()
            h = reader.allocate(AllocationRequest(request_id="r", prompt_token_ids=prompt))
            arrays.sync()
            t1 = clock()
            served = h.num_cached_tokens()
            reader.deallocate(h)
            reader.gc()  # forget the local copy: the next allocate reads the store again
            t3 = clock()
            h = fresh.allocate(AllocationRequest(request_id="f", prompt_token_ids=prompt))
            for layer in range(p.layers):
                fresh.write(h, layer, kv, kv)
            arrays.sync()
            t4 = clock()
        finally:
            reader.close()
            fresh.close()
        if rep:
            load_s.append(t1 - t0)
            write_s.append(t4 - t3)
    if served != blocks * p.block_size:
        raise RuntimeError(f"the reader was served {served} tokens from the store, expected "
                           f"{blocks * p.block_size}")
    result.details["load_prefix_tokens_served"] = served
    value, baseline = median(load_s), median(write_s)
    result.add(Figure(name="load_prefix_via_allocate", value=value, unit="s",
                      baseline=baseline,
                      baseline_label=f"allocate + write of the same {p.max_prompt} tokens "
                                     "without a store", ratio=value / baseline,
                      ratio_meaning="load / write fresh (lower is better)"))
    result.add(Figure(name="store_hit_per_block", value=value / blocks, unit="s"))
    # One block: allocate through a manager, against fetch_run of a connector alone,
    # interleaved, each after the other has warmed up.
    from ..stores import StoreConnector
    reader = KvCacheManager(CacheConfig(**base), backend=backend)
    try:
        with StoreConnector.open(base["store"], CacheConfig(**base)) as probe:
            one_s, fetch_s = [], []
            for rep in range(max(p.repeats, 20) + 1):
                t0 = clock()
                h = reader.allocate(AllocationRequest(request_id=f"o{rep}",
                                                      prompt_token_ids=one))
                t1 = clock()
                got = probe.fetch_run(one_key)
                t2 = clock()
                if h.num_cached_tokens() != p.block_size or len(got) != 1:
                    raise RuntimeError("the one-block prompt is not served from the store")
                reader.deallocate(h)
                reader.gc()  # forget the local copy: the next allocate reads the store
                if rep:
                    one_s.append(t1 - t0)
                    fetch_s.append(t2 - t1)
    finally:
        reader.close()
    value, baseline = median(one_s), median(fetch_s)
    result.add(Figure(name="hit_latency_via_allocate", value=value, unit="s", baseline=baseline,
                      baseline_label="fetch_run of the same one block by a connector alone",
                      ratio=value / baseline, ratio_meaning="allocate / fetch_run (lower is "
                                                            "better)"))
