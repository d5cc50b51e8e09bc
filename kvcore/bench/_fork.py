"""The ``fork`` workload: copy-on-write forks of one long sequence.

A parent of ``fork_tokens`` tokens is forked ``fork_children`` times the way beam
search or parallel sampling does it: the parent has reserved the position of its next
token (its last block is partly written), each child gets its own token there.  Every
child shares the parent's blocks, so writing that one token must copy exactly one
block (the partly written last one) and nothing else.

The baseline is what a cache without paging does to fork: copy the whole sequence,
K and V of every layer, into a preallocated dense buffer (one copy per child).  With
immutable arrays (JAX) the copy is the backend's ``transfer_blocks`` of the parent's
blocks into a dense pool, and each pool is taken from the manager afresh (a write
replaces it).
"""

from __future__ import annotations

import numpy as np

from .._backend import Backend
from .._device import DType
from .._manager import KvCacheManager
from ..models import AllocationRequest, CacheConfig
from ._arrays import BenchArrays
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import Progress, clock, median, spread

__all__ = ["run_fork"]


def run_fork(backend: Backend, p: BenchParams, progress: Progress) -> WorkloadResult:
    """The whole ``fork`` workload on ``backend``."""
    if p.fork_tokens < 1:
        raise ValueError(f"fork_tokens must be >= 1, got {p.fork_tokens}")
    began = clock()
    dtype = DType.parse(p.dtype)
    device = backend.default_device()
    arrays = BenchArrays(backend, dtype, device, seed=p.seed)
    parent_blocks = -(-p.fork_tokens // p.block_size)
    cfg = CacheConfig(num_layers=p.layers, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                      dtype=dtype, block_size=p.block_size, device=device,
                      num_blocks=parent_blocks + p.fork_children, enable_prefix_caching=False)

    t0 = clock()
    mgr = KvCacheManager(cfg, backend=backend)
    for layer in range(p.layers):
        arrays.touch(mgr.layer_pool(layer).native)
    # The dense baseline copies the parent's blocks (the same bytes) into this buffer.
    if arrays.mutable:
        dense = [arrays.zeros(2, parent_blocks, p.block_size, p.kv_heads, p.head_dim)
                 for _ in range(p.layers)]
    else:
        dense = [backend.allocate_layer(parent_blocks, p.block_size, p.kv_heads, p.head_dim,
                                        dtype, device) for _ in range(p.layers)]
        parent_ids = arrays.index(np.arange(parent_blocks))
    written = p.fork_tokens - 1  # the parent's last position is the one being sampled
    k = arrays.random(max(written, 1), p.kv_heads, p.head_dim)
    v = arrays.random(max(written, 1), p.kv_heads, p.head_dim)
    k1 = arrays.random(1, p.kv_heads, p.head_dim)
    v1 = arrays.random(1, p.kv_heads, p.head_dim)
    parent = mgr.allocate(AllocationRequest(request_id="parent", num_tokens=p.fork_tokens))
    if written:
        for layer in range(p.layers):
            mgr.write(parent, layer, k[:written], v[:written], start=0)
    arrays.sync()
    alloc_s = clock() - t0

    fork_s: list[float] = []
    write_s: list[float] = []
    dense_s: list[float] = []
    copied: list[int] = []
    for rep in range(p.repeats + 1):  # repeat 0 warms up
        progress(f"[{backend.name}] fork: {'warm-up' if rep == 0 else f'repeat {rep}/{p.repeats}'}")
        before = mgr.stats().copy_on_write_copies
        t0 = clock()
        children = [mgr.fork(parent, f"r{rep}-c{i}") for i in range(p.fork_children)]
        t1 = clock()
        for child in children:
            for layer in range(p.layers):
                mgr.write(child, layer, k1, v1)
        arrays.sync()
        t2 = clock()
        blocks = mgr.stats().copy_on_write_copies - before
        # Baseline: one full dense copy of the parent, timed once per child's worth.
        # The pools now (an immutable backend's writes above replaced them).
        pools = [mgr.layer_pool(layer).native for layer in range(p.layers)]
        t3 = clock()
        if arrays.mutable:
            for layer in range(p.layers):
                dense[layer][...] = pools[layer][:, :parent_blocks]
        else:
            for layer in range(p.layers):
                dense[layer] = backend.transfer_blocks(pools[layer], parent_ids, dense[layer],
                                                       parent_ids)
        arrays.sync()
        t4 = clock()
        for child in children:
            mgr.deallocate(child)
        if rep:
            fork_s.append((t1 - t0) / p.fork_children)
            write_s.append((t2 - t1) / p.fork_children)
            dense_s.append(t4 - t3)
            copied.append(blocks)

    per_child = copied[-1] / p.fork_children if copied else float("nan")
    block_bytes = cfg.bytes_per_block
    seq_bytes = parent_blocks * block_bytes
    result = WorkloadResult("fork", backend.name, alloc_s=alloc_s)
    result.add(Figure("blocks_copied_per_child", per_child, "blocks", float(parent_blocks),
                      "dense copy of the sequence", per_child / parent_blocks,
                      "cache / dense", "== 1 block", per_child == 1.0))
    result.add(Figure("bytes_copied_per_child", per_child * block_bytes, "B", float(seq_bytes),
                      "dense copy of the sequence", per_child * block_bytes / seq_bytes,
                      "cache / dense"))
    fork_plus_write = median(fork_s) + median(write_s)
    result.add(Figure("fork_and_write_s_per_child", fork_plus_write, "s", median(dense_s),
                      "dense copy of the sequence", fork_plus_write / median(dense_s),
                      "cache / dense (lower is better)"))
    result.add(Figure("fork_s_per_child", median(fork_s), "s"))
    result.details = {"fork_s_per_child": spread(fork_s), "write_s_per_child": spread(write_s),
                      "dense_copy_s": spread(dense_s), "parent_blocks": parent_blocks,
                      "bytes_per_block": block_bytes, "children": p.fork_children,
                      "parent_tokens": p.fork_tokens, "copies_per_repeat": copied}
    result.wall_s = clock() - began
    return result
