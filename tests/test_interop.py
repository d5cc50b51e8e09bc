"""Zero-copy interop between backends through DLPack.

A ``TensorRef`` from any backend is taken by ``torch.from_dlpack``, ``numpy.from_dlpack``
(CPU) and ``cupy.from_dlpack`` (GPU) without a copy; a cache accepts K/V in another
library's arrays on its own device, and refuses other devices naming both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch  # CI installs torch: a missing torch must fail here, not skip
from kv_torch._backend import cuda_problem

import kvcore
from kvcore import AllocationRequest, CacheConfig, KvCacheManager, TensorRef
from kvcore.errors import DeviceMismatchError


def make(backend: str, dtype: str = "float16", device: str = "cpu") -> KvCacheManager:
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype=dtype, block_size=4,
                      num_blocks=8, device=device)
    return KvCacheManager(cfg, backend=backend)


def filled(backend: str, dtype: str = "float16") -> tuple[KvCacheManager, kvcore.PagedKvCacheHandle, np.ndarray]:
    mgr = make(backend, dtype)
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=6))
    k = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(dtype)
    h.write(0, k, k + 1)  # numpy in, whatever the backend
    return mgr, h, k


# --- a TensorRef leaves the cache without a copy ---------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_torch_ref_to_numpy_and_torch_shares_storage(dtype: str) -> None:
    _, h, k = filled("torch", dtype)
    ref = h.key_cache(0)
    assert isinstance(ref, TensorRef) and isinstance(ref.native, torch.Tensor)
    as_np = np.from_dlpack(ref)
    np.testing.assert_array_equal(as_np, k)
    assert np.shares_memory(as_np, ref.native.numpy())
    as_torch = torch.from_dlpack(ref)
    assert as_torch.data_ptr() == ref.native.data_ptr()
    as_torch[0, 0, 0] = 42  # one storage: the numpy view sees the write
    assert float(as_np[0, 0, 0]) == 42


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_numpy_ref_to_torch_shares_storage(dtype: str) -> None:
    _, h, k = filled("numpy", dtype)
    ref = h.value_cache(0)
    assert isinstance(ref.native, np.ndarray)
    as_torch = torch.from_dlpack(ref)
    assert as_torch.dtype == getattr(torch, dtype)
    assert as_torch.data_ptr() == ref.native.ctypes.data
    assert np.shares_memory(as_torch.numpy(), ref.native)
    np.testing.assert_array_equal(as_torch.numpy(), k + 1)
    assert np.shares_memory(np.from_dlpack(ref), ref.native)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_layer_pool_is_shared_with_the_cache(backend: str) -> None:
    """The pool TensorRef is the cache's own memory: a write through a numpy view of a
    torch pool (or a torch view of a numpy pool) is what the cache reads back."""
    mgr, h, _ = filled(backend)
    pool = mgr.layer_pool(0)
    other = torch.from_dlpack(pool) if backend == "numpy" else np.from_dlpack(pool)
    slot = int(h.block_table().slots(0, 1)[0])
    other.reshape(2, -1, 2, 4)[0, slot] = 7
    assert np.all(np.from_dlpack(h.key_cache(0))[0] == 7)


def test_bfloat16_refs_go_to_torch_and_not_to_numpy() -> None:
    _, h, _ = filled("torch", "float32")
    mgr = make("torch", "bfloat16")
    b = mgr.allocate(AllocationRequest(request_id="b", num_tokens=6))
    b.write(0, h.key_cache(0).native.to(torch.bfloat16), h.value_cache(0).native.to(torch.bfloat16))
    ref = b.key_cache(0)
    assert torch.from_dlpack(ref).data_ptr() == ref.native.data_ptr()
    # numpy has no bfloat16, so DLPack cannot hand it over; to_numpy widens instead.
    with pytest.raises((RuntimeError, BufferError, TypeError)):
        np.from_dlpack(ref)
    assert mgr.backend.to_numpy(ref.native).dtype == np.float32


# --- K/V given in another library's arrays -----------------------------------------------


def test_numpy_arrays_into_a_torch_cache_and_tensors_into_a_numpy_cache() -> None:
    _, t_handle, k = filled("torch")  # numpy K/V written into torch
    np.testing.assert_array_equal(t_handle.key_cache(0).native.numpy(), k)
    n_mgr = make("numpy")
    n_handle = n_mgr.allocate(AllocationRequest(request_id="n", num_tokens=6))
    n_handle.write(0, torch.from_numpy(k), torch.from_numpy(k + 1))
    np.testing.assert_array_equal(n_handle.key_cache(0).native, k)
    # A TensorRef of one cache is a valid input to another cache of another backend.
    n_handle.write(1, t_handle.key_cache(0), t_handle.value_cache(0))
    t_handle.write(1, n_handle.key_cache(0), n_handle.value_cache(0))
    np.testing.assert_array_equal(n_handle.value_cache(1).native, k + 1)
    np.testing.assert_array_equal(t_handle.value_cache(1).native.numpy(), k + 1)


def test_torch_backend_wraps_numpy_input_without_copy() -> None:
    be = kvcore.get_backend("torch")
    k = np.zeros((3, 2, 4), np.float16)
    wrapped = be.asarray(k, kvcore.Device("cpu"))
    assert np.shares_memory(wrapped.numpy(), k)


class FakeCudaArray:
    """A DLPack producer that claims to live on ``cuda:0``; consuming it is a bug."""

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def __dlpack__(self, **kwargs: object) -> object:
        raise AssertionError("a foreign-device array must be refused before it is read")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_foreign_device_input_is_refused_naming_both_devices(backend: str) -> None:
    mgr, h, _ = filled(backend)
    before = h.num_written(0)
    with pytest.raises(DeviceMismatchError) as info:
        h.write(0, FakeCudaArray(), FakeCudaArray(), start=0)
    assert "cuda:0" in str(info.value) and "cpu" in str(info.value)
    assert h.num_written(0) == before  # nothing changed
    mgr.check_invariants()


@pytest.mark.gpu
def test_torch_refuses_a_cuda_tensor_for_a_cpu_cache() -> None:
    if cuda_problem() is not None:
        pytest.skip(f"needs a CUDA tensor; torch cannot use CUDA here: {cuda_problem()}")
    _, h, _ = filled("torch")
    gpu = torch.zeros(1, 2, 4, dtype=torch.float16, device="cuda:0")
    with pytest.raises(DeviceMismatchError, match=r"cuda:0.*cpu"):
        h.write(0, gpu, gpu, start=0)


# --- GPU interop (skipped with the probe's reason where there is no usable GPU) -----------


def _cupy_gpu_problem() -> str | None:
    try:
        kvcore.get_backend("cupy")
    except kvcore.errors.BackendError as exc:
        return str(exc)
    return cuda_problem()  # the tests below also need torch on CUDA


@pytest.mark.gpu
def test_gpu_refs_cross_torch_and_cupy_without_copy() -> None:
    problem = _cupy_gpu_problem()
    if problem is not None:
        pytest.skip(problem)
    import cupy

    t_mgr, c_mgr = make("torch", device="cuda:0"), make("cupy", device="cuda:0")
    t_h = t_mgr.allocate(AllocationRequest(request_id="t", num_tokens=5))
    c_h = c_mgr.allocate(AllocationRequest(request_id="c", num_tokens=5))
    k = torch.randn(5, 2, 4, device="cuda:0").half()
    t_h.write(0, k, k)
    c_h.write(0, k, k)  # a torch CUDA tensor into the cupy cache, through DLPack
    t_ref, c_ref = t_h.key_cache(0), c_h.key_cache(0)
    assert cupy.from_dlpack(t_ref).data.ptr == t_ref.native.data_ptr()
    assert torch.from_dlpack(c_ref).data_ptr() == c_ref.native.data.ptr
    t_h.write(1, cupy.asarray(c_ref.native), c_ref)  # cupy arrays into the torch cache
    assert torch.equal(t_h.key_cache(1).native, k)
    with pytest.raises(DeviceMismatchError, match=r"cpu.*cuda:0"):
        c_h.write(0, np.zeros((1, 2, 4), np.float16), np.zeros((1, 2, 4), np.float16))


@pytest.mark.gpu
def test_gpu_refs_cross_torch_and_cupy_on_cuda1_while_cuda0_is_current() -> None:
    from tests.gpu_support import gpu_count_reason

    problem = _cupy_gpu_problem()
    if problem is not None:
        pytest.skip(problem)
    import cupy

    if torch.cuda.device_count() < 2:
        pytest.skip(gpu_count_reason(2, torch.cuda.device_count()))
    torch.cuda.set_device(0)
    t_mgr, c_mgr = make("torch", device="cuda:1"), make("cupy", device="cuda:1")
    t_h = t_mgr.allocate(AllocationRequest(request_id="t", num_tokens=5))
    c_h = c_mgr.allocate(AllocationRequest(request_id="c", num_tokens=5))
    k = torch.randn(5, 2, 4, device="cuda:1").half()
    c_h.write(0, k, k)  # a cuda:1 torch tensor into the cupy cache, cuda:0 current
    t_h.write(0, c_h.key_cache(0), c_h.value_cache(0))  # cupy cuda:1 into torch
    assert torch.equal(t_h.key_cache(0).native, k)
    assert c_h.key_cache(0).native.device.id == 1
    assert torch.cuda.current_device() == 0 and cupy.cuda.runtime.getDevice() == 0
