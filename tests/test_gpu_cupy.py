"""The cupy backend on real GPUs, written to fail when the device paths are wrong: the
probe's kernels, swaps of hundreds of MB read by the host at once, a writer on one
stream and a swap or read on another (the writer delayed by a spinning kernel), a
decode step that must return while the GPU is busy, cuda:1 pools while cuda:0 is
current, typed DLPack errors from real torch tensors.

Marked ``gpu``; skipped with the backend's probe reason elsewhere, failing instead
under ``KVCORE_REQUIRE_GPU=1``.  Not run on real hardware yet (docs/backends.md).
"""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore.attention import PagedLayout, paged_attention
from kvcore.errors import DtypeMismatchError
from tests.gpu_support import needs_cupy_gpus, torch_problem

pytestmark = pytest.mark.gpu
one_gpu = needs_cupy_gpus(1)
two_gpus = needs_cupy_gpus(2)

GPU0, CPU = Device("cuda", 0), Device("cpu")
HEADS, DIM, BS = 8, 128, 16
BIG_BLOCKS = 2048  # 128 MiB of float16 K/V a layer
SPIN_CYCLES = 200_000_000

_SPIN_SOURCE = r"""
extern "C" __global__ void kvcore_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def spin(cycles: int = SPIN_CYCLES) -> None:
    """Keep the current stream of the current GPU busy for ``cycles`` clock cycles."""
    import cupy
    kernel = cupy.RawKernel(_SPIN_SOURCE, "kvcore_spin")
    kernel((1,), (1,), (np.int64(cycles),))


def random_kv(n: int, seed: int, device: int = 0):
    import cupy
    rng = np.random.default_rng(seed)
    shape = (n, HEADS, DIM)
    with cupy.cuda.Device(device):
        return (cupy.asarray(rng.standard_normal(shape).astype(np.float16)),
                cupy.asarray(rng.standard_normal(shape).astype(np.float16)))


def config(**over: object) -> CacheConfig:
    fields: dict[str, object] = {"num_layers": 2, "num_kv_heads": HEADS, "head_dim": DIM,
                                 "dtype": "float16", "block_size": BS, "num_blocks": BIG_BLOCKS,
                                 "device": "cuda:0", "swap_blocks": BIG_BLOCKS,
                                 "swap_device": "cpu"}
    fields.update(over)
    return CacheConfig(**fields)


def host_rows(pool: np.ndarray, plane: int, blocks, n: int) -> np.ndarray:
    return pool[plane, list(blocks)].reshape(-1, HEADS, DIM)[:n].view(np.uint16)


@one_gpu
def test_probe_ran_its_kernels_on_every_visible_gpu():
    import cupy
    from kv_cupy._backend import kernel_problem
    for index in range(cupy.cuda.runtime.getDeviceCount()):
        assert kernel_problem(index) is None


@one_gpu
def test_swap_of_hundreds_of_mb_is_complete_when_the_calls_return():
    import cupy
    mgr = KvCacheManager(config(), backend="cupy")
    assert isinstance(mgr._swap_layers[0], np.ndarray)
    n = (BIG_BLOCKS - 48) * BS
    h = mgr.allocate(AllocationRequest(request_id="big", num_tokens=n))
    want = []
    for layer in range(2):
        k, v = random_kv(n, seed=layer)
        h.write(layer, k, v)
        want.append((cupy.asnumpy(k).view(np.uint16), cupy.asnumpy(v).view(np.uint16)))
    mgr.swap_out(h)
    blocks = h.block_table().physical_blocks
    for layer in range(2):
        swap = mgr._swap_layers[layer]
        assert np.array_equal(host_rows(swap, 0, blocks, n), want[layer][0])
        assert np.array_equal(host_rows(swap, 1, blocks, n), want[layer][1])
    mgr.swap_in(h)
    reader = cupy.cuda.Stream(non_blocking=True)
    with reader:
        got = [cupy.asnumpy(h.key_array(layer), stream=reader) for layer in range(2)]
    for layer in range(2):
        assert np.array_equal(got[layer].view(np.uint16), want[layer][0])


@one_gpu
@pytest.mark.parametrize("layout", ["scattered", "consecutive"])
def test_backend_transfer_of_256_mb_lands_by_synchronize_in_bounded_chunks(layout):
    import cupy
    be = kvcore.get_backend("cupy")
    rng = np.random.default_rng(0)
    src = [cupy.asarray(rng.standard_normal((2, BIG_BLOCKS, BS, HEADS, DIM)).astype(np.float16))
           for _ in range(2)]
    host = [be.allocate_layer(BIG_BLOCKS, BS, HEADS, DIM, DType.float16, CPU, pinned=True)
            for _ in range(2)]
    src_ids = rng.permutation(BIG_BLOCKS)
    dst_ids = rng.permutation(BIG_BLOCKS) if layout == "scattered" else np.arange(BIG_BLOCKS)
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device(0).synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()  # the pool keeps freed blocks: its growth is the peak
    old, be.transfer_chunk_bytes = be.transfer_chunk_bytes, 8 << 20
    try:
        be.transfer_blocks_layers(src, be.index_array(src_ids, GPU0), host,
                                  be.index_array(dst_ids, CPU))
        be.synchronize(CPU)
    finally:
        be.transfer_chunk_bytes = old
    grown = pool.total_bytes() - before
    assert grown <= 3 * (8 << 20), f"a swap held {grown} bytes of GPU temporaries"
    for s, d in zip(src, host):
        assert np.array_equal(d[:, dst_ids].view(np.uint16),
                              cupy.asnumpy(s[:, src_ids]).view(np.uint16))


@one_gpu
def test_swap_on_another_stream_waits_for_the_writes_it_follows():
    import cupy
    mgr = KvCacheManager(config(num_layers=1, num_blocks=256, swap_blocks=256), backend="cupy")
    n = 256 * BS
    h = mgr.allocate(AllocationRequest(request_id="w", num_tokens=n))
    k, v = random_kv(n, seed=3)
    cupy.cuda.Device(0).synchronize()
    writer = cupy.cuda.Stream(non_blocking=True)
    with writer:
        spin()
        h.write(0, k, v)
    with cupy.cuda.Stream(non_blocking=True):
        mgr.swap_out(h)
    blocks = h.block_table().physical_blocks
    swap = mgr._swap_layers[0]
    assert np.array_equal(host_rows(swap, 0, blocks, n), cupy.asnumpy(k).view(np.uint16))


@one_gpu
def test_a_read_on_another_stream_sees_the_whole_write():
    import cupy
    mgr = KvCacheManager(config(num_layers=1, num_blocks=256, swap_blocks=0), backend="cupy")
    n = 256 * BS
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=n))
    k, v = random_kv(n, seed=4)
    cupy.cuda.Device(0).synchronize()
    with cupy.cuda.Stream(non_blocking=True):
        spin()
        h.write(0, k, v)
    reader = cupy.cuda.Stream(non_blocking=True)
    with reader:
        got = cupy.asnumpy(h.key_array(0), stream=reader)
    assert np.array_equal(got.view(np.uint16), cupy.asnumpy(k).view(np.uint16))


@one_gpu
def test_a_decode_step_returns_while_the_gpu_is_still_busy():
    import cupy
    cfg = config(num_layers=4, num_blocks=512, swap_blocks=0)
    mgr = KvCacheManager(cfg, backend="cupy")
    handles = [mgr.allocate(AllocationRequest(request_id=f"s{i}", num_tokens=40))
               for i in range(8)]
    for h in handles:
        k, v = random_kv(40, seed=7)
        for layer in range(4):
            h.write(layer, k, v)
    step_k, step_v = random_kv(8, seed=8)
    query = cupy.asarray(np.ones((8, 1, 2 * HEADS, DIM), np.float16))

    def step():
        mapping = mgr.extend_batch(handles)
        for layer in range(4):
            mgr.write_slots(layer, mapping, step_k, step_v)
        layout = PagedLayout.from_manager(mgr, handles)
        return [paged_attention(query, mgr.layer_pool(layer), layout) for layer in range(4)]

    spin()
    step()  # warm-up with the GPU busy: kernels compiled, pinned blocks cached
    cupy.cuda.Device(0).synchronize()
    spin()
    busy = cupy.cuda.get_current_stream().record()
    outs = step()
    assert not busy.done, "the step waited for the GPU to drain"
    cupy.cuda.Device(0).synchronize()
    assert all(bool(cupy.isfinite(o.astype(np.float32)).all()) for o in outs)


@one_gpu
def test_torch_tensors_that_cupy_cannot_take_get_typed_errors():
    if torch_problem() is not None:
        pytest.skip(torch_problem())
    import torch
    be = kvcore.get_backend("cupy")
    grad = torch.zeros(2, HEADS, DIM, device="cuda:0", requires_grad=True)
    with pytest.raises(TypeError, match=r"detach"):
        be.asarray(grad, GPU0)
    bf16 = torch.zeros(2, HEADS, DIM, device="cuda:0", dtype=torch.bfloat16)
    try:
        got = be.asarray(bf16, GPU0)
    except DtypeMismatchError:
        return  # no ml_dtypes: cupy refuses bfloat16, as a dtype error
    # With ml_dtypes cupy imports it; the manager then refuses the dtype by name.
    assert str(got.dtype) == "bfloat16"


@two_gpus
def test_a_cache_on_cuda1_works_while_cuda0_is_current():
    import cupy
    with cupy.cuda.Device(0):
        cfg = config(num_layers=1, num_blocks=64, swap_blocks=32, device="cuda:1")
        mgr = KvCacheManager(cfg, backend="cupy")
        h = mgr.allocate(AllocationRequest(request_id="one", num_tokens=50))
        k, v = random_kv(50, seed=6, device=1)
        h.write(0, k, v)
        mgr.swap_out(h)
        mgr.swap_in(h)
        got = h.key_array(0)
        assert got.device.id == 1
        assert np.array_equal(cupy.asnumpy(got).view(np.uint16), cupy.asnumpy(k).view(np.uint16))
        with cupy.cuda.Device(1):
            query = cupy.asarray(np.ones((1, 1, HEADS, DIM), np.float16))
        out = paged_attention(query, mgr.layer_pool(0), mgr.vllm_block_table([h]))
        assert out.device.id == 1
        assert cupy.cuda.runtime.getDevice() == 0
