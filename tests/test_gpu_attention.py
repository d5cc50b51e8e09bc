"""kvcore.attention on GPU pools (torch and cupy) against the numpy reference on the same
K/V, on cuda:0 and on cuda:1 while cuda:0 is current.  Marked ``gpu``; not run on real
hardware yet (docs/backends.md)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.attention import PagedLayout, paged_attention
from tests.gpu_support import cupy_problem, gpu_count_reason, torch_problem

pytestmark = pytest.mark.gpu
LENGTHS = [7, 33, 1, 20]


def _skip_unless(backend: str, device: int) -> None:
    problem = torch_problem() if backend == "torch" else cupy_problem()
    if problem is not None:
        pytest.skip(problem)
    if backend == "torch":
        import torch
        count = torch.cuda.device_count()
    else:
        import cupy
        count = int(cupy.cuda.runtime.getDeviceCount())
    if device >= count:
        pytest.skip(gpu_count_reason(device + 1, count))


def _to(backend: str, array: np.ndarray, device: int):
    if backend == "torch":
        import torch
        return torch.from_numpy(array).to(f"cuda:{device}")
    import cupy
    with cupy.cuda.Device(device):
        return cupy.asarray(array)


def _host(backend: str, array) -> np.ndarray:
    if backend == "torch":
        return array.float().cpu().numpy()
    import cupy
    return cupy.asnumpy(array).astype(np.float32)


def _managers(backend: str, device: int, dtype: str):
    rng = np.random.default_rng(0)
    mgrs, handles = [], []
    for name, dev in (("numpy", "cpu"), (backend, f"cuda:{device}")):
        cfg = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=16, dtype=dtype,
                          block_size=4, num_blocks=64, device=dev)
        mgrs.append(KvCacheManager(cfg, backend=name))
    for i, n in enumerate(LENGTHS):
        k = rng.standard_normal((n, 2, 16)).astype(dtype)
        v = rng.standard_normal((n, 2, 16)).astype(dtype)
        pair = []
        for mgr, is_gpu in zip(mgrs, (False, True)):
            h = mgr.allocate(AllocationRequest(request_id=f"r{i}", num_tokens=n))
            h.write(0, _to(backend, k, device) if is_gpu else k,
                    _to(backend, v, device) if is_gpu else v)
            pair.append(h)
        handles.append(pair)
    return mgrs, handles


@pytest.mark.parametrize("backend", ["torch", "cupy"])
@pytest.mark.parametrize("device", [0, 1], ids=["cuda0", "cuda1-while-cuda0-current"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_gpu_attention_matches_the_numpy_reference(backend, device, q_len):
    _skip_unless(backend, device)
    dtype = "float32"
    (ref_mgr, gpu_mgr), handles = _managers(backend, device, dtype)
    query = np.random.default_rng(1).standard_normal((len(LENGTHS), q_len, 4, 16))
    query = query.astype(dtype)
    qlens = np.minimum(q_len, LENGTHS)
    want = paged_attention(query, ref_mgr.layer_pool(0),
                           ref_mgr.vllm_block_table([h[0] for h in handles]),
                           query_lens=qlens)
    layout = PagedLayout.from_manager(gpu_mgr, [h[1] for h in handles])
    got = paged_attention(_to(backend, query, device), gpu_mgr.layer_pool(0), layout,
                          query_lens=qlens)
    if backend == "torch":
        assert got.device.index == device
        import torch
        assert torch.cuda.current_device() == 0
    else:
        assert got.device.id == device
        import cupy
        assert cupy.cuda.runtime.getDevice() == 0
    np.testing.assert_allclose(_host(backend, got), want, rtol=2e-5, atol=2e-5)
    # The same layout serves a second call (cached indices and mask) identically.
    again = paged_attention(_to(backend, query, device), gpu_mgr.layer_pool(0), layout,
                            query_lens=qlens)
    np.testing.assert_array_equal(_host(backend, again), _host(backend, got))

