"""The ``append`` (decode) and ``read`` workloads.

append: a batch of sequences gets a prompt written in one call per layer, then decode
steps that each extend the whole batch by one token and write it with one
``write_slots`` call per layer.  Its baseline (the *limit*) writes the same bytes by
slice assignment into a preallocated dense ``[2, batch, tokens, heads, dim]`` array
of the same library, one assignment per layer per step, interleaved step by step
with the cache so both see the same machine state.

read: afterwards, every sequence's K and V of every layer in logical order, three
ways, each against a plain copy of the same bytes out of the dense array: sequence
by sequence (``handle.key_cache(layer)``, the copy making the same number of calls);
a batch at a time (``manager.read_batch(handles, layer)``: ``[batch, tokens, heads,
dim]`` K and V, one gather each, against one copy of each dense plane); and the
route a paged kernel takes (``vllm_block_table`` once per pass, then the backend's
whole-block gather from ``layer_pool``, one per plane).

A library with immutable arrays (JAX) has no slice assignment: its dense array is
written with the backend's own ``scatter``, one call per layer per step, indices
built before timing (:class:`~kvcore.bench._arrays.DenseBaseline`).  Every timed
region ends with ``synchronize``, so asynchronous dispatch is waited for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import Backend
from .._device import DType
from .._manager import KvCacheManager
from ..models import AllocationRequest, CacheConfig
from ._arrays import BenchArrays, DenseBaseline
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import Progress, clock, median, spread

__all__ = ["run_append_read"]

#: Distinct decode inputs cycled through: enough that no write is a no-op repeat of
#: the previous one, few enough that generating them costs nothing.
_DECODE_INPUTS = 4
_GB = 1e9


def run_append_read(backend: Backend, p: BenchParams, *, want_append: bool, want_read: bool,
                    progress: Progress) -> list[WorkloadResult]:
    """Run append (and read, which needs append's state); one result per workload."""
    began = clock()
    dtype = DType.parse(p.dtype)
    device = backend.default_device()
    total = p.prompt + p.decode_steps
    per_seq_blocks = -(-total // p.block_size)
    cfg = CacheConfig(num_layers=p.layers, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                      dtype=dtype, block_size=p.block_size, device=device,
                      num_blocks=p.batch * per_seq_blocks, enable_prefix_caching=False)
    # K/V and the dense baseline are in the compute dtype (a codec's float16).
    arrays = BenchArrays(backend, cfg.compute_dtype, device, seed=p.seed)  # type: ignore[arg-type]
    bytes_per_token = cfg.bytes_per_token  # K + V over all layers, as stored

    # --- set-up, not timed: pools, dense baseline, inputs, first touch -------------
    t0 = clock()
    mgr = KvCacheManager(cfg, backend=backend)
    for layer in range(p.layers):
        for pool in mgr.layer_pools(layer):
            arrays.touch(pool.native)
    dense = DenseBaseline(arrays, p.layers, p.batch, total, p.kv_heads, p.head_dim)
    prompt_k = arrays.random(p.batch * p.prompt, p.kv_heads, p.head_dim)
    prompt_v = arrays.random(p.batch * p.prompt, p.kv_heads, p.head_dim)
    prompt_k4 = prompt_k.reshape(p.batch, p.prompt, p.kv_heads, p.head_dim)
    prompt_v4 = prompt_v.reshape(p.batch, p.prompt, p.kv_heads, p.head_dim)
    steps_kv = [(arrays.random(p.batch, p.kv_heads, p.head_dim),
                 arrays.random(p.batch, p.kv_heads, p.head_dim)) for _ in range(_DECODE_INPUTS)]
    dense.prepare(p.prompt, range(p.prompt, total))
    arrays.sync()
    alloc_s = clock() - t0

    prefill_kv: list[float] = []
    prefill_dense: list[float] = []
    step_kv: list[float] = []
    step_dense: list[float] = []
    read_kv: list[float] = []
    read_copy: list[float] = []
    batch_kv: list[float] = []
    route_kv: list[float] = []
    batch_copy: list[float] = []
    layers = range(p.layers)
    handles: list[Any] = []
    first_prefill: float | None = None
    first_step: float | None = None
    # One extra, untimed pass first: warms the allocator, caches and code paths.
    for rep in range(p.repeats + 1):
        warm = rep == 0
        progress(f"[{backend.name}] append: {'warm-up' if warm else f'repeat {rep}/{p.repeats}'}")
        handles = [mgr.allocate(AllocationRequest(request_id=f"r{rep}-s{b}", num_tokens=0))
                   for b in range(p.batch)]
        # Prefill: one write_slots per layer covers the whole batch's prompts.
        t0 = clock()
        mapping = mgr.extend_batch(handles, p.prompt)
        for layer in layers:
            mgr.write_slots(layer, mapping, prompt_k, prompt_v)
        arrays.sync()
        t1 = clock()
        if dense.mutable:  # inline slice assignment: nothing but the copy is timed
            for layer in layers:
                d = dense.layers[layer]
                d[0, :, :p.prompt] = prompt_k4
                d[1, :, :p.prompt] = prompt_v4
        else:
            for layer in layers:
                dense.write_prefix(layer, prompt_k, prompt_v)
        arrays.sync()
        t2 = clock()
        if not warm:
            prefill_kv.append(t1 - t0)
            prefill_dense.append(t2 - t1)
        else:
            first_prefill = t1 - t0
        # Decode: cache step and dense step alternate, so both see the same noise.
        for step in range(p.decode_steps):
            k, v = steps_kv[step % _DECODE_INPUTS]
            pos = p.prompt + step
            t0 = clock()
            mapping = mgr.extend_batch(handles, 1)
            for layer in layers:
                mgr.write_slots(layer, mapping, k, v)
            arrays.sync()
            t1 = clock()
            if dense.mutable:
                for layer in layers:
                    d = dense.layers[layer]
                    d[0, :, pos] = k
                    d[1, :, pos] = v
            else:
                for layer in layers:
                    dense.write_position(layer, pos, k, v)
            arrays.sync()
            t2 = clock()
            if not warm:
                step_kv.append(t1 - t0)
                step_dense.append(t2 - t1)
            elif step == 0:  # a JIT backend compiles here: reported, never in a median
                first_step = t1 - t0
        if want_read:
            progress(f"[{backend.name}] read: {'warm-up' if warm else f'repeat {rep}/{p.repeats}'}")
            a, b = _read_pass(handles, dense.layers, layers, arrays)
            c, d, e = _batch_read_pass(mgr, handles, dense.layers, layers, arrays)
            if not warm:
                read_kv.append(a)
                read_copy.append(b)
                batch_kv.append(c)
                batch_copy.append(e)
                if d is not None:
                    route_kv.append(d)
        if rep == p.repeats:
            _check_data(mgr, handles, p, prompt_k, steps_kv, backend)
        for h in handles:
            mgr.deallocate(h)
    wall = clock() - began

    results = []
    step_bytes = p.batch * bytes_per_token
    dense_label = ("dense slice assignment" if dense.mutable
                   else "dense array written by the backend's scatter (immutable arrays)")
    if want_append:
        r = WorkloadResult("append", backend.name, alloc_s=alloc_s, wall_s=wall)
        kv_step, dense_step = median(step_kv), median(step_dense)
        # The targets: 1.3x the dense limit on numpy, 1.5x elsewhere.
        limit = 1.3 if backend.name == "numpy" else 1.5
        r.add(Figure("decode_step_s", kv_step, "s", dense_step, dense_label,
                     kv_step / dense_step, "cache / dense (lower is better)",
                     f"<= {limit}x dense", kv_step / dense_step <= limit))
        r.add(Figure("decode_tokens_per_s", p.batch / kv_step, "tok/s", p.batch / dense_step,
                     dense_label, dense_step / kv_step, "cache / dense"))
        r.add(Figure("decode_write_GBps", step_bytes / kv_step / _GB, "GB/s",
                     step_bytes / dense_step / _GB, dense_label,
                     dense_step / kv_step, "cache / dense"))
        kv_pre, dense_pre = median(prefill_kv), median(prefill_dense)
        pre_bytes = p.batch * p.prompt * bytes_per_token
        r.add(Figure("prefill_write_GBps", pre_bytes / kv_pre / _GB, "GB/s",
                     pre_bytes / dense_pre / _GB, dense_label,
                     dense_pre / kv_pre, "cache / dense"))
        r.details = {"decode_step_s": spread(step_kv), "dense_step_s": spread(step_dense),
                     "prefill_s": spread(prefill_kv), "dense_prefill_s": spread(prefill_dense),
                     # The warm-up's first prefill and decode step: what a JIT backend
                     # spends compiling shows here and nowhere else.
                     "first_prefill_s": first_prefill, "first_decode_step_s": first_step,
                     "bytes_per_decode_step": step_bytes, "bytes_per_prefill": pre_bytes,
                     "shape": {"layers": p.layers, "kv_heads": p.kv_heads,
                               "head_dim": p.head_dim, "dtype": p.dtype, "batch": p.batch,
                               "prompt": p.prompt, "decode_steps": p.decode_steps}}
        results.append(r)
    if want_read:
        r = WorkloadResult("read", backend.name, alloc_s=alloc_s, wall_s=wall)
        read_bytes = p.batch * total * bytes_per_token
        kv_read, copy_read = median(read_kv), median(read_copy)
        bw, base = read_bytes / kv_read / _GB, read_bytes / copy_read / _GB
        r.add(Figure("read_GBps", bw, "GB/s", base, "plain copy of the same bytes",
                     bw / base, "cache / copy (higher is better)", ">= 0.5x copy",
                     bw / base >= 0.5))
        r.add(Figure("read_pass_s", kv_read, "s", copy_read, "plain copy of the same bytes",
                     kv_read / copy_read, "cache / copy"))
        kv_batch, copy_batch = median(batch_kv), median(batch_copy)
        bw, base = read_bytes / kv_batch / _GB, read_bytes / copy_batch / _GB
        r.add(Figure("batch_read_GBps", bw, "GB/s", base, "plain copy of each dense plane",
                     bw / base, "read_batch / copy (higher is better)", ">= 0.7x copy",
                     bw / base >= 0.7))
        if route_kv:  # a codec cache has no one-pool route (codes and scales)
            route = read_bytes / median(route_kv) / _GB
            r.add(Figure("page_table_read_GBps", route, "GB/s", base,
                         "plain copy of each dense plane", route / base,
                         "vllm_block_table + block gather / copy", ">= 0.7x copy",
                         route / base >= 0.7))
        r.details = {"read_pass_s": spread(read_kv), "copy_pass_s": spread(read_copy),
                     "batch_read_pass_s": spread(batch_kv),
                     "page_table_pass_s": spread(route_kv) if route_kv else None,
                     "batch_copy_pass_s": spread(batch_copy),
                     "bytes_per_pass": read_bytes,
                     "calls_per_pass": 2 * p.layers * p.batch}
        results.append(r)
    return results


def _read_pass(handles: list[Any], dense: list[Any], layers: range,
               arrays: BenchArrays) -> tuple[float, float]:
    """One read of everything through the cache, then one plain copy of it."""
    t0 = clock()
    for layer in layers:
        for h in handles:
            h.key_cache(layer)
            h.value_cache(layer)
    arrays.sync()
    t1 = clock()
    copy = arrays.copy
    for layer in layers:
        d = dense[layer]
        for b in range(len(handles)):
            copy(d[0, b])
            copy(d[1, b])
    arrays.sync()
    return t1 - t0, clock() - t1


def _batch_read_pass(mgr: KvCacheManager, handles: list[Any], dense: list[Any], layers: range,
                     arrays: BenchArrays) -> tuple[float, float | None, float]:
    """Everything read a batch at a time, then through a page table and the backend's
    block gather (``None`` for a codec cache: its pools hold codes and scales), then
    one plain copy of each dense plane."""
    t0 = clock()
    for layer in layers:
        mgr.read_batch(handles, layer)
    arrays.sync()
    t1 = clock()
    if mgr.config.codec is not None:
        return t1 - t0, None, _copy_planes(dense, layers, arrays)
    backend = mgr.backend
    table = mgr.vllm_block_table(handles)
    blocks = table.block_tables.astype(np.int64)
    # A backend without whole-block gathers reads the pages' slots (what a kernel
    # walking the page table does).
    whole = type(backend).gather_blocks is not Backend.gather_blocks
    gather = backend.gather_blocks if whole else backend.gather
    ids = blocks if whole else \
        blocks[..., None] * table.block_size + np.arange(table.block_size, dtype=np.int64)
    index = backend.index_array(ids, mgr.config.device)
    for layer in layers:
        pool = mgr.layer_pool(layer).native
        gather(pool, 0, index)
        gather(pool, 1, index)
    arrays.sync()
    t2 = clock()
    return t1 - t0, t2 - t1, _copy_planes(dense, layers, arrays)


def _copy_planes(dense: list[Any], layers: range, arrays: BenchArrays) -> float:
    """Seconds for one plain copy of each dense plane of every layer."""
    t0 = clock()
    copy = arrays.copy
    for layer in layers:
        d = dense[layer]
        copy(d[0])
        copy(d[1])
    arrays.sync()
    return clock() - t0


def _check_data(mgr: KvCacheManager, handles: list[Any], p: BenchParams, prompt_k: Any,
                steps_kv: list[tuple[Any, Any]], backend: Backend) -> None:
    """A benchmark of wrong data is worthless: compare what the last sequence reads
    back (last layer) with what was written."""
    b = len(handles) - 1
    got = backend.to_numpy(handles[b].key_cache(p.layers - 1).native)
    want_prompt = backend.to_numpy(prompt_k)[b * p.prompt:(b + 1) * p.prompt]
    host_steps = [backend.to_numpy(k)[b] for k, _ in steps_kv]
    want_decode = np.stack([host_steps[s % _DECODE_INPUTS] for s in range(p.decode_steps)]) \
        if p.decode_steps else got[:0]
    want = np.concatenate([want_prompt, want_decode])
    codec = mgr.config.codec
    if codec is not None and got.shape == want.shape:  # lossy: within its declared bound
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if not (err <= codec.error_bound(want, mgr.config.compute_dtype)).all():
            raise AssertionError(f"backend {backend.name!r}: K read back after the append "
                                 f"workload is outside the {codec.dtype.value} codec's bound")
        return
    if got.shape != want.shape or not np.array_equal(got, want):
        raise AssertionError(f"backend {backend.name!r}: K read back after the append "
                             "workload differs from what was written")
