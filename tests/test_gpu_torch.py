"""The torch backend on real GPUs, written to fail when the CUDA paths are wrong.

* Swaps of hundreds of MB, read by the host (or by another stream) the moment the call
  returns: a missing wait shows as zeros or half-copied blocks.
* A decode step under ``torch.cuda.set_sync_debug_mode("error")`` and behind a long GPU
  sleep: any host synchronisation raises, or finishes the sleep before the check.
* A writer on one stream and a swap or a read on another, the writer delayed by a GPU
  sleep so that an unordered reader reads zeros.
* cuda:1 pools and DLPack producers while cuda:0 is current (skipped, and allowed to
  skip under KVCORE_REQUIRE_GPU=1, only where the machine has one GPU).
* A swap's GPU temporaries, measured by the caching allocator, stay within the chunks.

Marked ``gpu``; skipped with torch's reason elsewhere, and failing instead under
``KVCORE_REQUIRE_GPU=1`` (``make gpu-check``).  Not run on real hardware yet: see
docs/backends.md, "What is verified where".
"""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore.attention import PagedLayout, paged_attention
from tests.gpu_support import needs_torch_gpus

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu
one_gpu = needs_torch_gpus(1)
two_gpus = needs_torch_gpus(2)

GPU0, GPU1, CPU = Device("cuda", 0), Device("cuda", 1), Device("cpu")
HEADS, DIM, BS = 8, 128, 16
BLOCK_BYTES = 2 * BS * HEADS * DIM * 2  # one layer's K and V of a float16 block: 64 KiB
BIG_BLOCKS = 2048  # 128 MiB a layer, 256 MiB for two layers
SPIN = 200_000_000  # GPU cycles torch.cuda._sleep spins: ~0.1-0.2 s on current GPUs


def big_config(device: str = "cuda:0", **over: object) -> CacheConfig:
    fields: dict[str, object] = {"num_layers": 2, "num_kv_heads": HEADS, "head_dim": DIM,
                                 "dtype": "float16", "block_size": BS,
                                 "num_blocks": BIG_BLOCKS, "device": device,
                                 "swap_blocks": BIG_BLOCKS, "swap_device": "cpu"}
    fields.update(over)
    return CacheConfig(**fields)


def random_kv(n: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (n, HEADS, DIM)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float16),
            torch.randn(shape, generator=gen, device=device, dtype=torch.float16))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int16)


def host_blocks(pool: torch.Tensor, plane: int, blocks: tuple[int, ...], n: int) -> torch.Tensor:
    """Rows ``0..n`` of ``blocks`` of a host pool, read straight from its memory."""
    return pool[plane, list(blocks)].reshape(-1, HEADS, DIM)[:n]


# --- hundreds of MB, read the moment the call returns -------------------------------------


@one_gpu
def test_swap_of_hundreds_of_mb_is_complete_when_swap_out_and_swap_in_return():
    mgr = KvCacheManager(big_config(), backend="torch")
    n = (BIG_BLOCKS - 48) * BS  # 125 MiB a layer, across ~2 chunks of 64 MiB
    h = mgr.allocate(AllocationRequest(request_id="big", num_tokens=n))
    want = []
    for layer in range(2):
        k, v = random_kv(n, "cuda:0", seed=layer)
        h.write(layer, k, v)
        want.append((bits(k), bits(v)))
    mgr.swap_out(h)
    blocks = h.block_table().physical_blocks
    for layer in range(2):  # the host reads the pinned swap pool at once
        swap = mgr._swap_layers[layer]
        assert torch.equal(host_blocks(swap, 0, blocks, n).view(torch.int16), want[layer][0])
        assert torch.equal(host_blocks(swap, 1, blocks, n).view(torch.int16), want[layer][1])
    mgr.swap_in(h)
    reader = torch.cuda.Stream()
    with torch.cuda.stream(reader):  # another stream, no wait of its own
        got = [mgr.layer_pool(layer).native.clone() for layer in range(2)]
    reader.synchronize()
    blocks = list(h.block_table().physical_blocks)
    for layer in range(2):
        rows = got[layer][:, blocks].reshape(2, -1, HEADS, DIM)[:, :n]
        assert torch.equal(bits(rows[0]), want[layer][0])
        assert torch.equal(bits(rows[1]), want[layer][1])
    mgr.check_invariants()


@one_gpu
@pytest.mark.parametrize("layout", ["scattered", "consecutive"])
def test_backend_transfer_of_256_mb_lands_by_synchronize_and_bounds_gpu_temporaries(layout):
    import kvcore
    be = kvcore.get_backend("torch")
    gen = torch.Generator(device="cuda").manual_seed(7)
    shape = (2, BIG_BLOCKS, BS, HEADS, DIM)
    src = [torch.randn(shape, generator=gen, device="cuda:0").half() for _ in range(2)]
    host = [be.allocate_layer(BIG_BLOCKS, BS, HEADS, DIM, DType.float16, CPU, pinned=True)
            for _ in range(2)]
    assert all(p.is_pinned() for p in host)
    rng = np.random.default_rng(0)
    src_ids = rng.permutation(BIG_BLOCKS)
    dst_ids = rng.permutation(BIG_BLOCKS) if layout == "scattered" else np.arange(BIG_BLOCKS)
    chunk = 8 << 20
    old_chunk, be.transfer_chunk_bytes = be.transfer_chunk_bytes, chunk
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        be.transfer_blocks_layers(src, be.index_array(src_ids, GPU0), host,
                                  be.index_array(dst_ids, CPU))
        be.synchronize(CPU)
        for s, d in zip(src, host):  # host reads right after synchronize
            assert torch.equal(d[:, dst_ids].view(torch.int16), bits(s[:, src_ids]))
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= 3 * chunk, f"a swap held {peak} bytes of GPU temporaries"
        back = [torch.zeros_like(s) for s in src]
        be.transfer_blocks_layers(host, be.index_array(dst_ids, CPU), back,
                                  be.index_array(src_ids, GPU0))
        be.synchronize(GPU0)
        other = torch.cuda.Stream()
        with torch.cuda.stream(other):
            copies = [b.clone() for b in back]
        other.synchronize()
        for s, b in zip(src, copies):
            assert torch.equal(bits(b), bits(s))
    finally:
        be.transfer_chunk_bytes = old_chunk


# --- no host synchronisation in a decode step ---------------------------------------------


def _decode_setup(device: str = "cuda:0"):
    cfg = CacheConfig(num_layers=4, num_kv_heads=HEADS, head_dim=DIM, dtype="float16",
                      block_size=BS, num_blocks=512, device=device)
    mgr = KvCacheManager(cfg, backend="torch")
    handles = [mgr.allocate(AllocationRequest(request_id=f"s{i}", num_tokens=40 + i))
               for i in range(8)]
    for i, h in enumerate(handles):
        k, v = random_kv(40 + i, device, seed=100 + i)
        for layer in range(4):
            h.write(layer, k, v)
    step_k, step_v = random_kv(len(handles), device, seed=1)
    query = torch.randn(len(handles), 1, 2 * HEADS, DIM, device=device, dtype=torch.float16)
    return mgr, handles, step_k, step_v, query


def _decode_step(mgr, handles, step_k, step_v, query):
    mapping = mgr.extend_batch(handles)
    for layer in range(4):
        mgr.write_slots(layer, mapping, step_k, step_v)
    layout = PagedLayout.from_manager(mgr, handles)
    outs = [paged_attention(query, mgr.layer_pool(layer), layout) for layer in range(4)]
    reads = [handles[0].key_cache(layer) for layer in range(4)]
    return outs, reads


@one_gpu
def test_a_decode_step_never_synchronizes_the_host():
    state = _decode_setup()
    _decode_step(*state)  # warm-up: kernels, pinned blocks, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _decode_step(*state)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@one_gpu
def test_a_decode_step_returns_while_the_gpu_is_still_busy():
    state = _decode_setup()
    # Warm up with the GPU busy too, so the pinned-memory cache already holds a block
    # for every copy a step has in flight at once.
    torch.cuda._sleep(SPIN)
    _decode_step(*state)
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN)
    busy = torch.cuda.Event()
    busy.record()
    outs, reads = _decode_step(*state)
    assert not busy.query(), "the step waited for the GPU to drain"
    torch.cuda.synchronize()
    assert all(torch.isfinite(o.float()).all() for o in outs)
    assert reads[0].shape[0] == 41


# --- writers and readers on different streams ----------------------------------------------


def _delayed_write(h, layer, k, v, stream):
    """Enqueue ``h.write`` on ``stream`` behind a GPU sleep: it lands late."""
    stream.wait_stream(torch.cuda.current_stream())  # k and v are ready
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SPIN)
        h.write(layer, k, v)


@one_gpu
def test_swap_on_another_stream_waits_for_the_writes_it_follows():
    mgr = KvCacheManager(big_config(num_blocks=256, swap_blocks=256, num_layers=1),
                         backend="torch")
    n = 256 * BS
    h = mgr.allocate(AllocationRequest(request_id="w", num_tokens=n))
    k, v = random_kv(n, "cuda:0", seed=3)
    _delayed_write(h, 0, k, v, torch.cuda.Stream())
    with torch.cuda.stream(torch.cuda.Stream()):
        mgr.swap_out(h)  # enqueued on a stream that knows nothing of the writer
    swap = mgr._swap_layers[0]
    blocks = h.block_table().physical_blocks
    assert torch.equal(host_blocks(swap, 0, blocks, n).view(torch.int16), bits(k))
    assert torch.equal(host_blocks(swap, 1, blocks, n).view(torch.int16), bits(v))


@one_gpu
def test_a_read_on_another_stream_sees_the_whole_write():
    mgr = KvCacheManager(big_config(num_blocks=256, swap_blocks=0, num_layers=1),
                         backend="torch")
    n = 256 * BS
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=n))
    k, v = random_kv(n, "cuda:0", seed=4)
    _delayed_write(h, 0, k, v, torch.cuda.Stream())
    reader = torch.cuda.Stream()
    with torch.cuda.stream(reader):
        got = h.key_tensor(0).clone()
    reader.synchronize()
    assert torch.equal(bits(got), bits(k))


@one_gpu
def test_an_index_copied_on_one_stream_is_safe_to_use_on_another():
    cfg = CacheConfig(num_layers=2, num_kv_heads=HEADS, head_dim=DIM, dtype="float16",
                      block_size=BS, num_blocks=64, device="cuda:0")
    mgr = KvCacheManager(cfg, backend="torch")
    handles = [mgr.allocate(AllocationRequest(request_id=f"i{i}", num_tokens=5))
               for i in range(16)]
    for h in handles:
        for layer in range(2):
            h.write(layer, *random_kv(5, "cuda:0", seed=9))
    mapping = mgr.extend_batch(handles)
    k, v = random_kv(16, "cuda:0", seed=5)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    a.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(SPIN)
        mgr.write_slots(0, mapping, k, v)  # the slot index is copied here, on a, late
    b.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(b):
        mgr.write_slots(1, mapping, k, v)  # reuses that index on b
    torch.cuda.synchronize()
    for i, h in enumerate(handles):
        assert torch.equal(bits(h.key_tensor(1)[5]), bits(k[i]))
        assert torch.equal(bits(h.value_tensor(0)[5]), bits(v[i]))


# --- two GPUs ------------------------------------------------------------------------------


@two_gpus
def test_a_cache_on_cuda1_works_while_cuda0_is_current():
    torch.cuda.set_device(0)
    cfg = CacheConfig(num_layers=2, num_kv_heads=HEADS, head_dim=DIM, dtype="float16",
                      block_size=BS, num_blocks=64, device="cuda:1", swap_blocks=32)
    mgr = KvCacheManager(cfg, backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="one", num_tokens=50))
    k, v = random_kv(50, "cuda:1", seed=6)
    for layer in range(2):
        h.write(layer, k, v)
    mgr.swap_out(h)
    mgr.swap_in(h)
    got = h.key_tensor(1)
    assert got.device == torch.device("cuda", 1) and torch.equal(bits(got), bits(k))
    query = torch.randn(1, 1, HEADS, DIM, device="cuda:1", dtype=torch.float16)
    out = paged_attention(query, mgr.layer_pool(0), mgr.vllm_block_table([h]))
    assert out.device == torch.device("cuda", 1) and torch.isfinite(out.float()).all()
    assert torch.cuda.current_device() == 0


class Producer:
    """A DLPack producer that is not a tensor (so the backend imports it)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.dtype = tensor.dtype

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


@two_gpus
def test_a_dlpack_producer_on_cuda1_imports_while_cuda0_is_current():
    torch.cuda.set_device(0)
    cfg = CacheConfig(num_layers=1, num_kv_heads=HEADS, head_dim=DIM, dtype="float16",
                      block_size=BS, num_blocks=8, device="cuda:1")
    mgr = KvCacheManager(cfg, backend="torch")
    h = mgr.allocate(AllocationRequest(request_id="p", num_tokens=3))
    k, v = random_kv(3, "cuda:1", seed=8)
    h.write(0, Producer(k), Producer(v))  # torch refuses to export cuda:1 from cuda:0
    assert torch.equal(bits(h.key_tensor(0)), bits(k))
    assert torch.cuda.current_device() == 0


@two_gpus
def test_blocks_move_between_gpus_in_chunks():
    import kvcore
    be = kvcore.get_backend("torch")
    gen = torch.Generator(device="cuda:0").manual_seed(11)
    src = torch.randn((2, 256, BS, HEADS, DIM), generator=gen, device="cuda:0").half()
    dst = be.allocate_layer(256, BS, HEADS, DIM, DType.float16, GPU1)
    order = np.random.default_rng(1).permutation(256)
    old, be.transfer_chunk_bytes = be.transfer_chunk_bytes, 4 << 20
    try:
        be.transfer_blocks(src, be.index_array(order, GPU0), dst,
                           be.index_array(np.arange(256), GPU1))
        be.synchronize(GPU1)
    finally:
        be.transfer_chunk_bytes = old
    assert torch.equal(bits(dst), bits(src[:, order]))
