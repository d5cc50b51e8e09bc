"""The cupy backend: what runs everywhere (the plugin imports without cupy or a GPU and
reports why it is unavailable, in the CUDA runtime's words or with the package to
install; the host-side swap-pool paths), and the GPU tests, marked ``gpu`` and skipped
with the probe's own reason where no GPU is usable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvcore
from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore.errors import BackendUnavailableError, DeviceMismatchError, UnsupportedError

CPU = Device("cpu")
GPU = Device("cuda", 0)


def _runtime_problem() -> str | None:
    """What ``cupy.cuda.runtime.getDeviceCount()`` says here, asked directly (not
    through the backend), so the tests compare the backend against the runtime."""
    try:
        import cupy
    except ImportError as exc:
        return f"cupy is not importable: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raises is the reason
        return str(exc)
    return None if count > 0 else "getDeviceCount() returned 0"


try:
    import cupy  # noqa: F401
    HAVE_CUPY = True
except ImportError:
    HAVE_CUPY = False
RUNTIME_PROBLEM = _runtime_problem()
needs_cupy = pytest.mark.skipif(not HAVE_CUPY, reason="cupy is not installed here")
needs_gpu = pytest.mark.skipif(RUNTIME_PROBLEM is not None,
                               reason=f"cupy cannot use a GPU here: {RUNTIME_PROBLEM}")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- runs on every machine -----------------------------------------------------------------


def test_plugin_and_handle_import_without_importing_cupy() -> None:
    out = run_python("""
        import sys
        import kv_cupy, kv_cupy._plugin
        from kv_cupy import CupyKvCacheHandle
        import kvcore
        specs = kv_cupy._plugin.kvcore_backends()
        assert [s.name for s in specs] == ["cupy"], specs
        assert issubclass(CupyKvCacheHandle, kvcore.PagedKvCacheHandle)
        kvcore.list_backends()
        print(",".join(m for m in ("cupy", "torch") if m in sys.modules))
    """)
    assert out == ""


def test_missing_cupy_names_the_package_to_install() -> None:
    out = run_python("""
        import json, sys
        sys.modules["cupy"] = None  # as if no cupy wheel were installed
        import kvcore
        from kvcore.errors import BackendUnavailableError
        rec = {r.name: r for r in kvcore.list_backends(probe=True)}["cupy"]
        try:
            kvcore.get_backend("cupy")
            err = None
        except BackendUnavailableError as exc:
            err = str(exc)
        print(json.dumps({"available": rec.available, "reason": rec.reason, "error": err,
                          "numpy": {r.name: r for r in kvcore.list_backends()}["numpy"].available}))
    """)
    got = json.loads(out)
    assert got["available"] is False and got["numpy"] is True
    for text in (got["reason"], got["error"]):
        assert "library 'cupy' is not installed" in text
        assert 'pip install "kvcore-cupy[cuda12]"' in text and "[cuda13]" in text


@needs_cupy
def test_probe_reports_the_cuda_runtimes_own_reason() -> None:
    record = {r.name: r for r in kvcore.list_backends(probe=True)}["cupy"]
    assert record.distribution == "kvcore-cupy" and record.probed
    if RUNTIME_PROBLEM is None:
        assert record.available, record.reason
        return
    # Here (no usable GPU): exactly what the runtime raised, e.g.
    # "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA
    # runtime version".
    assert not record.available
    assert f"cupy.cuda.runtime.getDeviceCount() failed: {RUNTIME_PROBLEM}" in record.reason
    with pytest.raises(BackendUnavailableError) as info:
        kvcore.get_backend("cupy")
    assert RUNTIME_PROBLEM in str(info.value) and "'cupy'" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="getDeviceCount"):
        KvCacheManager(CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2,
                                   device="cuda:0"), backend="cupy")


def test_cli_shows_cupy_with_its_reason() -> None:
    result = subprocess.run([sys.executable, "-m", "kvcore", "backends", "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    record = {r["name"]: r for r in json.loads(result.stdout)}["cupy"]
    if RUNTIME_PROBLEM is None:
        assert record["available"]
    else:
        assert not record["available"] and record["reason"]
        if HAVE_CUPY:
            assert RUNTIME_PROBLEM in record["reason"]


@needs_cupy
def test_declared_capabilities_and_device_checks() -> None:
    from kv_cupy import CupyBackend, CupyKvCacheHandle

    be = CupyBackend()
    assert be.handle_class is CupyKvCacheHandle and be.array_library == "cupy"
    caps = be.capabilities()
    assert caps.device_types == ("cuda",) and set(caps.swap_device_types) == {"cpu", "cuda"}
    assert caps.dtypes == (DType.float16, DType.float32, DType.uint8, DType.int8)
    assert caps.codecs == (DType.int8,)
    with pytest.raises(UnsupportedError, match="'float8_e4m3' codec: cupy has no float8 dtype"):
        be.check_codec(DType.float8_e4m3)
    with pytest.raises(UnsupportedError, match="bfloat16.*cupy has no bfloat16"):
        be.check_dtype(DType.bfloat16)
    with pytest.raises(UnsupportedError, match="'cpu'.*cuda:N"):
        be.check_device(CPU)
    if RUNTIME_PROBLEM is not None:
        with pytest.raises(UnsupportedError) as info:
            be.check_device(GPU)
        assert "cuda:0" in str(info.value) and RUNTIME_PROBLEM in str(info.value)


@needs_cupy
@pytest.mark.parametrize("dtype", [DType.float16, DType.float32], ids=str)
def test_host_swap_pool_paths(dtype: DType) -> None:
    """A cupy pool swaps to numpy arrays in host memory; the operations on those run
    here.  (Pinned allocation needs the driver, so ``pinned=False``.)"""
    from kv_cupy import CupyBackend

    be = CupyBackend()
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 4, 2, 3)).astype(dtype.value)
    src = be.from_numpy(ref, dtype, CPU)
    assert isinstance(src, np.ndarray) and not np.shares_memory(src, ref)
    assert be.describe(src) == ((2, 5, 4, 2, 3), dtype, CPU)
    dst = be.allocate_layer(num_blocks=3, block_size=4, num_kv_heads=2, head_dim=3,
                            dtype=dtype, device=CPU)
    assert not dst.any()
    s, d = np.array([4, 0, 2]), np.array([1, 2, 0])
    be.transfer_blocks(src, be.index_array(s, CPU), dst, be.index_array(d, CPU))
    be.synchronize(CPU)
    want = np.zeros_like(dst)
    want[:, d] = ref[:, s]
    np.testing.assert_array_equal(be.to_numpy(dst), want)
    be.copy_blocks(dst, be.index_array(np.array([1, 2]), CPU), be.index_array(np.array([2, 0]), CPU))
    want[:, [2, 0]] = want[:, [1, 2]]
    np.testing.assert_array_equal(dst, want)
    k = rng.standard_normal((2, 2, 3)).astype(dtype.value)
    dst = be.scatter(dst, be.index_array(np.array([11, 3]), CPU), (k, -k))
    np.testing.assert_array_equal(be.gather(dst, 1, be.index_array(np.array([3, 11]), CPU)),
                                  -k[::-1])


@needs_cupy
def test_numpy_input_is_refused_for_a_gpu_cache_naming_both_devices() -> None:
    from kv_cupy import CupyBackend

    with pytest.raises(DeviceMismatchError, match=r"numpy array is on cpu, the cache is on cuda:0"):
        CupyBackend().asarray(np.zeros((1, 2, 3), np.float16), GPU)

    class FakeCpuProducer:
        def __dlpack__(self, **kwargs: object) -> object:
            raise AssertionError("must not be consumed")

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

    with pytest.raises(DeviceMismatchError, match=r"is on cpu, the cache is on cuda:0"):
        CupyBackend().asarray(FakeCpuProducer(), GPU)
    with pytest.raises(TypeError, match="list"):
        CupyBackend().asarray([1.0], GPU)


# --- GPU (skipped here with the runtime's reason) -------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [DType.float16, DType.float32], ids=str)
def test_gpu_operations_match_numpy(dtype: DType) -> None:
    import cupy

    be = kvcore.get_backend("cupy")
    rng = np.random.default_rng(1)
    layer = be.allocate_layer(num_blocks=6, block_size=4, num_kv_heads=2, head_dim=3,
                              dtype=dtype, device=GPU)
    assert isinstance(layer, cupy.ndarray) and be.describe(layer)[2] == GPU
    ref = np.zeros((2, 24, 2, 3), dtype.value)
    slots = np.array([5, 0, 23, 9], np.int64)
    k = rng.standard_normal((4, 2, 3)).astype(dtype.value)
    layer = be.scatter(layer, be.index_array(slots, GPU), (cupy.asarray(k), cupy.asarray(-k)))
    ref[0, slots], ref[1, slots] = k, -k
    np.testing.assert_array_equal(be.to_numpy(layer).reshape(2, 24, 2, 3), ref)
    got = be.gather(layer, 1, be.index_array(slots[::-1].copy(), GPU))
    np.testing.assert_array_equal(be.to_numpy(got), ref[1, slots[::-1]])
    pool = ref.reshape(2, 6, 4, 2, 3).copy()
    be.copy_blocks(layer, be.index_array(np.array([0, 1]), GPU), be.index_array(np.array([1, 2]), GPU))
    pool[:, [1, 2]] = pool[:, [0, 1]]
    np.testing.assert_array_equal(be.to_numpy(layer), pool)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [DType.float16, DType.float32], ids=str)
def test_gpu_manager_swaps_to_pinned_host_bit_identical(dtype: DType) -> None:
    import cupy
    from kv_cupy import CupyKvCacheHandle

    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype=dtype, block_size=4,
                      num_blocks=16, device="cuda:0", swap_blocks=8, swap_device="cpu")
    mgr = KvCacheManager(cfg, backend="cupy")
    h = mgr.allocate(AllocationRequest(request_id="s", num_tokens=9))
    assert isinstance(h, CupyKvCacheHandle)
    rng = np.random.default_rng(2)
    k = rng.standard_normal((9, 2, 4)).astype(dtype.value)
    for layer in range(2):
        h.write(layer, cupy.asarray(k), cupy.asarray(k * 2))
    raw = cupy.asnumpy(h.key_array(1)).view(np.uint16 if dtype is DType.float16 else np.uint32)
    mgr.swap_out(h)
    mgr.swap_in(h)
    again = cupy.asnumpy(h.key_array(1)).view(raw.dtype)
    np.testing.assert_array_equal(again, raw)
    np.testing.assert_array_equal(cupy.asnumpy(h.value_array(0)), k * 2)
    mgr.check_invariants()
