"""The ``blocks`` workload: the block manager alone, at serving scale.

A pool of ``pool_blocks`` blocks serves ``sequences`` requests whose prompt lengths
are drawn uniformly from ``1..max_prompt`` (seeded).  Requests are admitted in order
while the blocks they will end up holding fit the pool (continuous batching); every
step extends the whole running batch by one token with one ``extend_batch`` call;
a sequence is freed after ``appends`` tokens.  The model shape is one layer of one
head of one element: the workload measures book-keeping, not array traffic.

Five variants run back to back in every repeat, on the same requests:

* ``off``: unique prompts, prefix caching switched off;
* ``on``: the same unique prompts with prefix caching on (a 0% hit rate: every
  block is hashed and registered, none is found), so ``on / off`` is what caching
  costs when it never pays;
* ``shared``: half of the prompts start with one shared ``shared_prefix``-token
  prefix, caching on; reports the hit rate;
* ``engine`` / ``engine_off``: the shared prompts again, and every decode step passes
  the new tokens' ids (as vLLM and nano-vllm do, so full decode blocks are cached
  too), with caching on and off: ``engine / engine_off`` is what an engine pays for
  prefix caching.

A further measurement times serving blocks from the prefix cache: ``hit_sequences``
requests whose whole ``max_prompt``-token prompt is cached, against allocating the
same blocks fresh with caching off.

Requests (pydantic models holding the prompt) are built before the clock starts: that
is the caller's work, not the cache's.  After each allocation the prompt's K/V are
written (one ``write`` call, outside the timed calls, reported as ``prefill_s``): the
manager serves a cached block only once its K/V are written, as a real engine's
prefill would have done.
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
from ._timing import Progress, clock, median, spread

__all__ = ["run_blocks"]

_VOCAB = 32000
_US = 1e6


def _config(backend: Backend, p: BenchParams, caching: bool, num_blocks: int) -> CacheConfig:
    return CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, dtype=DType.parse(p.dtype),
                       block_size=p.block_size, num_blocks=num_blocks,
                       device=backend.default_device(), enable_prefix_caching=caching)


def _requests(p: BenchParams, lengths: np.ndarray, shared: bool) -> list[AllocationRequest]:
    """One request per sequence; with ``shared``, every other prompt starts with the
    same prefix.  Token ids are random over a 32k vocabulary, so unique prompts never
    share a block by chance."""
    rng = np.random.default_rng(p.seed + 1)
    prefix = rng.integers(0, _VOCAB, p.shared_prefix)
    out = []
    for i, length in enumerate(lengths.tolist()):
        tokens = rng.integers(0, _VOCAB, length)
        if shared and i % 2 == 0:
            k = min(length, p.shared_prefix)
            tokens[:k] = prefix[:k]
        out.append(AllocationRequest(request_id=f"s{i}", prompt_token_ids=tuple(tokens.tolist())))
    return out


def _prefill(mgr: KvCacheManager, handle: Any, length: int, kv: tuple[Any, Any]) -> None:
    """Write the prompt's K/V after the cached part (the model's prefill)."""
    cached = handle.num_cached_tokens()
    if length > cached:
        mgr.write(handle, 0, kv[0][cached:length], kv[1][cached:length], start=cached)


def _prompt_kv(backend: Backend, p: BenchParams) -> tuple[Any, Any]:
    arrays = BenchArrays(backend, DType.parse(p.dtype), backend.default_device(), p.seed)
    return arrays.random(p.max_prompt, 1, 1), arrays.random(p.max_prompt, 1, 1)


def _serve(backend: Backend, p: BenchParams, caching: bool, requests: list[AllocationRequest],
           need: list[int], kv: tuple[Any, Any],
           step_ids: np.ndarray | None = None) -> dict[str, float]:
    """Run every request through allocate / ``appends`` x extend_batch / deallocate.
    With ``step_ids`` (``[steps, sequences]`` token ids, made before the clock), every
    decode step passes the new tokens' ids, as an engine does so that the blocks
    decoding fills are prefix-cached too.

    Returns the seconds spent inside each manager call kind, and the counts needed to
    turn them into per-block and per-token costs."""
    mgr = KvCacheManager(_config(backend, p, caching, p.pool_blocks), backend=backend)
    t_alloc = t_extend = t_free = t_prefill = 0.0
    running: list[Any] = []
    finish: list[int] = []      # the step after which running[i] is done
    owed: list[int] = []        # blocks running[i] will hold at the end
    reserved = 0                # blocks the running sequences will hold at the end
    admitted = step = 0
    n, appends, pool = len(requests), p.appends, p.pool_blocks
    began = clock()
    while admitted < n or running:
        while admitted < n and reserved + need[admitted] <= pool:
            req = requests[admitted]
            t0 = clock()
            handle = mgr.allocate(req)
            t1 = clock()
            _prefill(mgr, handle, req.num_tokens or 0, kv)
            t_prefill += clock() - t1
            t_alloc += t1 - t0
            running.append(handle)
            finish.append(step + appends)
            owed.append(need[admitted])
            reserved += need[admitted]
            admitted += 1
        ids = None if step_ids is None else step_ids[step % step_ids.shape[0], :len(running), None]
        t0 = clock()
        mgr.extend_batch(running, 1, token_ids=ids)
        t_extend += clock() - t0
        step += 1
        # Sequences admitted together finish together, oldest first: a prefix.
        done = 0
        while done < len(running) and finish[done] == step:
            reserved -= owed[done]
            t0 = clock()
            mgr.deallocate(running[done])
            t_free += clock() - t0
            done += 1
        if done:
            del running[:done], finish[:done], owed[:done]
    wall = clock() - began - t_prefill
    stats = mgr.stats()
    mgr.check_invariants()  # a fast manager that corrupts its pool proves nothing
    return {"alloc_s": t_alloc, "extend_s": t_extend, "free_s": t_free,
            "manager_s": t_alloc + t_extend + t_free, "loop_s": wall, "steps": step,
            "prefill_s": t_prefill,
            "hit_rate": stats.prefix_cache_hit_rate, "hits": stats.prefix_cache_hits,
            "queries": stats.prefix_cache_queries}


def _hits(backend: Backend, p: BenchParams, caching: bool,
          kv: tuple[Any, Any]) -> tuple[float, int]:
    """Seconds per block to allocate ``hit_sequences`` requests of one cached
    ``max_prompt``-token prompt (with ``caching``), or fresh (without)."""
    blocks = p.max_prompt // p.block_size
    mgr = KvCacheManager(_config(backend, p, caching, max(p.pool_blocks, 2 * blocks)),
                         backend=backend)
    rng = np.random.default_rng(p.seed + 2)
    prompt = tuple(rng.integers(0, _VOCAB, blocks * p.block_size).tolist())
    reqs = [AllocationRequest(request_id=f"h{i}", prompt_token_ids=prompt)
            for i in range(p.hit_sequences + 1)]
    first = mgr.allocate(reqs[0])
    _prefill(mgr, first, len(prompt), kv)
    mgr.deallocate(first)  # the prompt stays cached: its blocks are free but reusable
    total = 0.0
    for req in reqs[1:]:
        t0 = clock()
        h = mgr.allocate(req)
        total += clock() - t0
        mgr.deallocate(h)
    served = mgr.stats().prefix_cache_hits
    return total / (p.hit_sequences * blocks), served


def _floor_free_list(blocks: int, chunk: int) -> float:
    """Seconds per block for the least a Python allocator can do: pop block ids off a
    plain list and push them back (no refcounts, no hashing, no queue order)."""
    free = list(range(max(blocks, chunk)))
    pop, extend = free.pop, free.extend
    t0 = clock()
    for _ in range(max(1, blocks // chunk)):
        taken = [pop() for _ in range(chunk)]
        extend(taken)
    return (clock() - t0) / (max(1, blocks // chunk) * chunk)


def _floor_decode(batch: int, steps: int, block_size: int) -> float:
    """Seconds per token for the least a per-sequence decode step can do in Python:
    bump each length and compute its slot."""
    lengths = list(range(batch))
    last = list(range(batch))
    t0 = clock()
    for _ in range(steps):
        lengths = [n + 1 for n in lengths]
        np.array([b * block_size + n % block_size for b, n in zip(last, lengths)], np.int64)
    return (clock() - t0) / (batch * steps)


def run_blocks(backend: Backend, p: BenchParams, progress: Progress) -> WorkloadResult:
    """The whole ``blocks`` workload on ``backend``."""
    began = clock()
    result = WorkloadResult("blocks", backend.name)
    lengths = np.random.default_rng(p.seed).integers(1, p.max_prompt + 1, p.sequences)
    bs = p.block_size
    need = [-(-(int(n) + p.appends) // bs) for n in lengths]
    if max(need) > p.pool_blocks:
        raise ValueError(f"a sequence of {p.max_prompt + p.appends} tokens needs {max(need)} "
                         f"blocks; the pool has {p.pool_blocks}")
    progress(f"[{backend.name}] blocks: building {2 * p.sequences} requests")
    t0 = clock()
    unique = _requests(p, lengths, shared=False)
    shared = _requests(p, lengths, shared=True)
    build_s = clock() - t0

    kv = _prompt_kv(backend, p)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in ("off", "on", "shared",
                                                               "engine_off", "engine")}
    # The engine variants' decode token ids: random, made before the clock.
    step_ids = np.random.default_rng(p.seed + 3).integers(
        0, _VOCAB, (max(p.appends, 1), p.sequences), dtype=np.int64)
    # Repeat 0 is a warm-up; variants alternate so drift hits all of them alike.
    for rep in range(p.repeats + 1):
        label = "warm-up" if rep == 0 else f"repeat {rep}/{p.repeats}"
        for variant, caching, reqs, ids in (
                ("off", False, unique, None), ("on", True, unique, None),
                ("shared", True, shared, None), ("engine_off", False, shared, step_ids),
                ("engine", True, shared, step_ids)):
            progress(f"[{backend.name}] blocks: {label}, {variant}")
            out = _serve(backend, p, caching, reqs, need, kv, ids)
            if rep:
                runs[variant].append(out)
    progress(f"[{backend.name}] blocks: prefix-cache hits")
    hit_on = [_hits(backend, p, True, kv) for _ in range(p.repeats)]
    hit_off = [_hits(backend, p, False, kv) for _ in range(p.repeats)]

    def med(variant: str, key: str) -> float:
        return median([r[key] for r in runs[variant]])

    prompt_blocks = sum(-(-int(n) // bs) for n in lengths)
    held_blocks = sum(need)
    tokens = p.sequences * p.appends
    floor_block = _floor_free_list(held_blocks, 64)
    floor_token = _floor_decode(min(p.sequences, 1024), 64, bs)

    alloc_us = med("off", "alloc_s") / prompt_blocks * _US
    free_us = med("off", "free_s") / held_blocks * _US
    per_block = alloc_us + free_us
    result.add(Figure("alloc_free_us_per_block", per_block, "us", floor_block * _US,
                      "python free list (pop + push)", per_block / (floor_block * _US),
                      "cache / floor", "<= 1 us", per_block <= 1.0))
    per_token = med("off", "extend_s") / tokens * _US
    result.add(Figure("append_us_per_token", per_token, "us", floor_token * _US,
                      "python per-sequence slot loop", per_token / (floor_token * _US),
                      "cache / floor", "<= 1 us", per_token <= 1.0))
    hit_us = median([h[0] for h in hit_on]) * _US
    fresh_us = median([h[0] for h in hit_off]) * _US
    result.add(Figure("prefix_hit_us_per_block", hit_us, "us", fresh_us,
                      "fresh allocation, caching off", hit_us / fresh_us, "hit / fresh",
                      "<= 0.5 us", hit_us <= 0.5))
    ratios = [on["manager_s"] / off["manager_s"] for on, off in zip(runs["on"], runs["off"])]
    slowdown = median(ratios)
    result.add(Figure("caching_on_0pct_hit_s", med("on", "manager_s"), "s",
                      med("off", "manager_s"), "same workload, caching off", slowdown,
                      "on / off (paired medians)", "<= 1.05x off", slowdown <= 1.05))
    ops = p.sequences * 2 + tokens  # allocations + frees + appended tokens
    result.add(Figure("ops_per_s", ops / med("off", "manager_s"), "op/s",
                      ops / med("on", "manager_s"), "caching on, 0% hits",
                      med("on", "manager_s") / med("off", "manager_s"), "off / on"))
    result.add(Figure("shared_prefix_hit_rate", med("shared", "hit_rate"), "",
                      med("on", "hit_rate"), "unique prompts (caching on)"))
    engine = median([e["manager_s"] / o["manager_s"]
                     for e, o in zip(runs["engine"], runs["engine_off"])])
    result.add(Figure("engine_caching_s", med("engine", "manager_s"), "s",
                      med("engine_off", "manager_s"), "same engine run, caching off", engine,
                      "on / off (paired medians)", "<= 1.5x off", engine <= 1.5))
    result.add(Figure("engine_hit_rate", med("engine", "hit_rate"), "",
                      med("shared", "hit_rate"), "shared prompts, no decode ids"))
    result.add(Figure("shared_prefix_ops_per_s", ops / med("shared", "manager_s"), "op/s",
                      ops / med("on", "manager_s"), "unique prompts (caching on)",
                      med("on", "manager_s") / med("shared", "manager_s"), "shared / unique"))
    result.alloc_s = build_s
    result.wall_s = clock() - began
    result.details = {
        "variants": {v: {k: spread([r[k] for r in rs]) for k in rs[0]} for v, rs in runs.items()},
        "prompt_blocks": prompt_blocks, "blocks_held_at_end": held_blocks,
        "appended_tokens": tokens, "operations": ops,
        "prefix_hit_blocks_served": hit_on[0][1] if hit_on else 0,
        "request_build_s": build_s,
        "sizes": {"pool_blocks": p.pool_blocks, "block_size": bs, "sequences": p.sequences,
                  "max_prompt": p.max_prompt, "appends": p.appends,
                  "shared_prefix": p.shared_prefix, "hit_sequences": p.hit_sequences},
    }
    return result
