"""The store figures that need a manager owning a StoreConnector (issue 15's wiring).

* ``decode_step_with_store``: one decode step (``extend_batch`` + ``write_slots`` per
  layer) of ``batch`` sequences with a store attached, against the same step without
  one, interleaved step by step.  Blocks complete every ``block_size`` steps and the
  manager offers them; the issue's target is at most 1.1x.
* ``load_prefix_via_allocate``: ``allocate`` of a ``max_prompt``-token prompt that a
  first manager wrote and closed (so it is in the store and nowhere else), against
  allocating the same prompt in a manager without a store and writing its K/V.

Both are measured only once ``CacheConfig`` has the fields the integration adds
(``store``, ``hash_key``); until then :func:`measure_with_manager` records why in the
result's details and adds no figure.  The API assumed is the one the connector's
docstring describes: ``CacheConfig(store=URL, hash_key=..., store_options=...)``, the
manager offering completed blocks and reading through in ``allocate``, and
``KvCacheManager.close()`` flushing the connector.
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
    """Add the two figures to ``result``, or say in ``result.details`` why not."""
    missing = [f for f in INTEGRATION_FIELDS if f not in CacheConfig.model_fields]
    if missing or not hasattr(KvCacheManager, "close"):
        what = ", ".join(f"CacheConfig.{f}" for f in missing) or "KvCacheManager.close"
        result.details["with_manager"] = (
            f"not measured: the manager does not own a StoreConnector yet (no {what}); "
            "decode_step_with_store and load_prefix_via_allocate need the integration")
        return
    hash_key = np.random.default_rng(p.seed).bytes(32)
    dtype = DType.parse(p.dtype)
    device = backend.default_device()
    arrays = BenchArrays(backend, dtype, device, seed=p.seed)
    steps = max(p.block_size * 2, p.decode_steps)
    blocks = p.batch * (-(-(p.prompt + steps) // p.block_size)) + 1
    base = dict(num_layers=p.layers, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                dtype=dtype, block_size=p.block_size, device=device, num_blocks=blocks)
    plain = KvCacheManager(CacheConfig(**base), backend=backend)
    stored = KvCacheManager(CacheConfig(**base, store=url, hash_key=hash_key), backend=backend)
    try:
        _decode(result, plain, stored, arrays, p, steps)
    finally:
        stored.close()
    _load(result, backend, base, url, hash_key, arrays, p)


def _prompt(p: BenchParams, seed: int, length: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng(seed).integers(0, 32000, length).tolist())


def _decode(result: WorkloadResult, plain: KvCacheManager, stored: KvCacheManager,
            arrays: BenchArrays, p: BenchParams, steps: int) -> None:
    k = arrays.random(p.batch, p.kv_heads, p.head_dim)
    v = arrays.random(p.batch, p.kv_heads, p.head_dim)
    handles = {}
    for name, mgr in (("plain", plain), ("stored", stored)):
        handles[name] = [mgr.allocate(AllocationRequest(
            request_id=f"{name}-{b}", prompt_token_ids=_prompt(p, 100 + b, p.prompt)))
            for b in range(p.batch)]
        pk = arrays.random(p.batch * p.prompt, p.kv_heads, p.head_dim)
        for h_index, h in enumerate(handles[name]):
            for layer in range(p.layers):
                rows = slice(h_index * p.prompt, (h_index + 1) * p.prompt)
                mgr.write(h, layer, pk[rows], pk[rows])
    times: dict[str, list[float]] = {"plain": [], "stored": []}
    for _ in range(steps):
        for name, mgr in (("plain", plain), ("stored", stored)):
            t0 = clock()
            mapping = mgr.extend_batch(handles[name], 1)
            for layer in range(p.layers):
                mgr.write_slots(layer, mapping, k, v)
            arrays.sync()
            times[name].append(clock() - t0)
    value, baseline = median(times["stored"]), median(times["plain"])
    result.add(Figure(name="decode_step_with_store", value=value, unit="s", baseline=baseline,
                      baseline_label="the same decode step without a store",
                      ratio=value / baseline, ratio_meaning="with / without (lower is better)",
                      target="<= 1.1x", met=value / baseline <= 1.1))


def _load(result: WorkloadResult, backend: Backend, base: dict[str, Any], url: str,
          hash_key: bytes, arrays: BenchArrays, p: BenchParams) -> None:
    prompt = _prompt(p, 7, p.max_prompt)
    kv = arrays.random(p.max_prompt, p.kv_heads, p.head_dim)
    writer = KvCacheManager(CacheConfig(**base, store=url, hash_key=hash_key), backend=backend)
    h = writer.allocate(AllocationRequest(request_id="w", prompt_token_ids=prompt))
    for layer in range(p.layers):
        writer.write(h, layer, kv, kv)
    writer.close()  # flushes the write-behind queue
    load_s, write_s = [], []
    for rep in range(p.repeats + 1):
        reader = KvCacheManager(CacheConfig(**base, store=url, hash_key=hash_key),
                                backend=backend)
        t0 = clock()
        h = reader.allocate(AllocationRequest(request_id=f"r{rep}", prompt_token_ids=prompt))
        t1 = clock()
        served = h.num_cached_tokens()
        reader.close()
        fresh = KvCacheManager(CacheConfig(**base), backend=backend)
        t2 = clock()
        h = fresh.allocate(AllocationRequest(request_id=f"f{rep}", prompt_token_ids=prompt))
        for layer in range(p.layers):
            fresh.write(h, layer, kv, kv)
        arrays.sync()
        t3 = clock()
        if rep:
            load_s.append(t1 - t0)
            write_s.append(t3 - t2)
        result.details["load_prefix_tokens_served"] = served
    value, baseline = median(load_s), median(write_s)
    result.add(Figure(name="load_prefix_via_allocate", value=value, unit="s",
                      baseline=baseline,
                      baseline_label=f"allocate + write of the same {p.max_prompt} tokens "
                                     "without a store", ratio=value / baseline,
                      ratio_meaning="load / write fresh (lower is better)"))
