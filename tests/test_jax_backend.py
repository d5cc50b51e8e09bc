"""The jax backend: every operation bit for bit against numpy (NaN payloads,
subnormals and signed zeros included) in all three dtypes, index padding and
compilation counts, donation, imports and their errors, the manager end to end, what
a pool view guarantees, paged attention, the conformance suite and the bench.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from kv_jax import JaxBackend, JaxKvCacheHandle
from kv_jax._index import MAX_SLOTS, JaxIndex, bucket
from kv_jax._kernels import Kernels
from kv_jax._selfcheck import PATTERNS, bit_exact_problems

import kvcore
from kvcore import AllocationRequest, CacheConfig, Device, DType, KvCacheManager
from kvcore.attention import paged_attention
from kvcore.errors import (
    ArrayMismatchError,
    DeviceMismatchError,
    DtypeMismatchError,
    ShapeMismatchError,
    UnsupportedError,
)

pytest_plugins = ["pytester"]

CPU = Device("cpu")
DTYPES = [DType.float16, DType.bfloat16, DType.float32]
HOST = {DType.float16: np.dtype(np.float16), DType.bfloat16: np.dtype(ml_dtypes.bfloat16),
        DType.float32: np.dtype(np.float32)}
UINT = {DType.float16: np.uint16, DType.bfloat16: np.uint16, DType.float32: np.uint32}
# One shape for most tests, so they share compiled kernels: 6 blocks of 4 slots.
NB, BS, H, D = 6, 4, 2, 3


@pytest.fixture(scope="module")
def be() -> JaxBackend:
    backend = kvcore.get_backend("jax")
    assert isinstance(backend, JaxBackend)
    return backend


def random_bits(rng: np.random.Generator, shape: tuple[int, ...], dtype: DType) -> np.ndarray:
    """Arbitrary raw bits (every NaN payload, subnormal and signed zero can occur),
    with the self-check's special patterns in the first row."""
    uint = UINT[dtype]
    out = rng.integers(0, np.iinfo(uint).max, size=shape, dtype=uint, endpoint=True)
    flat = out.reshape(shape[0], -1)
    special = PATTERNS[dtype]
    flat[0, :min(flat.shape[1], special.shape[0])] = special[:flat.shape[1]]
    return out


def native(be: JaxBackend, raw: np.ndarray, dtype: DType) -> jax.Array:
    """Host bits as a jax array of ``dtype`` (from_numpy of same-dtype data keeps bits)."""
    return be.from_numpy(raw.view(HOST[dtype]), dtype, CPU)


def bits(array: jax.Array) -> np.ndarray:
    """The raw bits of a jax array, so equality means bit-identical."""
    host = np.asarray(array)
    return host.view(np.uint32 if host.dtype.itemsize == 4 else np.uint16)


def filled_pool(be: JaxBackend, dtype: DType, rng: np.random.Generator,
                num_blocks: int = NB) -> tuple[jax.Array, np.ndarray]:
    """A pool whose every slot holds distinct random bits, and its host bits."""
    want = random_bits(rng, (2, num_blocks * BS, H, D), dtype)
    pool = be.allocate_layer(num_blocks, BS, H, D, dtype, CPU)
    idx = be.index_array(np.arange(num_blocks * BS), CPU)
    pool = be.scatter(pool, idx, (native(be, want[0], dtype), native(be, want[1], dtype)))
    return pool, want.reshape(2, num_blocks, BS, H, D)


# --- identity and capabilities ---------------------------------------------------------

def test_backend_is_listed_available_and_declares_immutable_pools(be: JaxBackend) -> None:
    record = {r.name: r for r in kvcore.list_backends(probe=True)}["jax"]
    assert record.available and record.distribution == "kvcore-jax"
    caps = be.capabilities()
    assert caps.device_types == ("cpu",) and caps.swap_device_types == ("cpu",)
    assert caps.dtypes == tuple(DTYPES) and not caps.unsupported_dtypes
    assert caps.mutable_pools is False and caps.dlpack and not caps.pinned_memory
    assert be.handle_class is JaxKvCacheHandle and be.api_version == 2


def test_discovery_and_plugin_import_do_not_import_jax() -> None:
    code = ("import sys, kvcore, kv_jax, kv_jax._plugin; kvcore.list_backends(); "
            "print([m for m in ('jax', 'jaxlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_unusable_jax_is_reported_unavailable_with_its_reason() -> None:
    import os
    code = ("import kvcore\n"
            "try:\n    kvcore.get_backend('jax')\n"
            "except kvcore.errors.BackendUnavailableError as exc:\n    print(exc)\n")
    env = {**os.environ, "JAX_PLATFORMS": "tpu"}  # no TPU plugin here: JAX refuses
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout
    assert "no usable CPU device" in out and "libtpu" in out  # JAX's own words
    assert "JAX_PLATFORMS='tpu' must include 'cpu'" in out


def test_devices_other_than_the_cpu_are_refused_with_the_name(be: JaxBackend) -> None:
    with pytest.raises(UnsupportedError, match="cuda:0"):
        be.allocate_layer(NB, BS, H, D, DType.float16, Device("cuda"))
    with pytest.raises(UnsupportedError, match="tpu"):
        KvCacheManager(CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D, num_blocks=NB,
                                   block_size=BS, device="tpu"), backend=be)


def test_self_check_passes_every_dtype_with_the_shipped_kernels(be: JaxBackend) -> None:
    # The backend self-checks bfloat16 at start-up; float16 and float32 here.
    assert bit_exact_problems(be, DTYPES) == {}


def test_self_check_refuses_bfloat16_when_xla_normalises_it() -> None:
    # Without the compiler option XLA:CPU computes bfloat16 data movement in float32
    # and canonicalises NaN payloads: the self-check must see it and not declare it.
    plain = JaxBackend(kernels=Kernels(compiler_options={}))
    caps = plain.capabilities()
    assert DType.bfloat16 not in caps.dtypes
    reason = caps.unsupported_dtypes[DType.bfloat16]
    assert "changes bits" in reason and "0x7f81" in reason  # a signalling NaN's payload
    assert DType.float16 in caps.dtypes and DType.float32 in caps.dtypes


# --- pools and the bulk operations -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_allocate_layer_is_fresh_zeroed_and_described(be: JaxBackend, dtype: DType) -> None:
    a = be.allocate_layer(NB, BS, H, D, dtype, CPU)
    b = be.allocate_layer(NB, BS, H, D, dtype, CPU, planes=1)
    assert be.describe(a) == ((2, NB, BS, H, D), dtype, CPU)
    assert be.describe(b) == ((1, NB, BS, H, D), dtype, CPU)
    assert not bits(a).any() and not bits(b).any()  # +0.0, never -0.0
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    assert a.committed  # like every kernel output: one executable serves both


def test_pools_of_2_to_the_31_slots_are_refused_before_allocating(be: JaxBackend) -> None:
    with pytest.raises(UnsupportedError, match="int32"):
        be.allocate_layer(2**27, 16, 1, 1, DType.float16, CPU)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_and_gather_move_every_bit_pattern(be: JaxBackend, dtype: DType) -> None:
    rng = np.random.default_rng(0)
    pool, host = filled_pool(be, dtype, rng)
    ref = host.reshape(2, -1, H, D).copy()
    slots = rng.permutation(NB * BS)[:7]
    k, v = random_bits(rng, (7, H, D), dtype), random_bits(rng, (7, H, D), dtype)
    pool = be.scatter(pool, be.index_array(slots, CPU), (native(be, k, dtype),
                                                          native(be, v, dtype)))
    ref[0, slots], ref[1, slots] = k, v  # overwrite, never add
    assert np.array_equal(bits(pool).reshape(ref.shape), ref)
    order = rng.permutation(NB * BS)[:11]  # neither sorted nor a bucket length
    for plane in (0, 1):
        got = be.gather(pool, plane, be.index_array(order, CPU))
        assert got.shape == (11, H, D) and got.dtype == HOST[dtype]
        assert np.array_equal(bits(got), ref[plane, order])
    square = order[:8].reshape(2, 4)  # any index shape: slots.shape + (H, D)
    got = be.gather(pool, 1, be.index_array(square, CPU))
    assert got.shape == (2, 4, H, D) and np.array_equal(bits(got), ref[1, square])


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_and_transfer_blocks_move_every_bit_pattern(be: JaxBackend, dtype: DType) -> None:
    rng = np.random.default_rng(1)
    pool, host = filled_pool(be, dtype, rng)
    src, dst = np.array([4, 0, 3]), np.array([1, 5, 2])
    pool = be.copy_blocks(pool, be.index_array(src, CPU), be.index_array(dst, CPU))
    want = host.copy()
    want[:, dst] = host[:, src]
    assert np.array_equal(bits(pool), want)
    away = be.allocate_layer(3, BS, H, D, dtype, CPU)
    away = be.transfer_blocks(pool, be.index_array(np.array([5, 1]), CPU), away,
                              be.index_array(np.array([2, 0]), CPU))
    want_away = np.zeros_like(want[:, :3])
    want_away[:, [2, 0]] = want[:, [5, 1]]
    assert np.array_equal(bits(away), want_away)
    assert not pool.is_deleted()  # the source of a transfer is read, never donated


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_padding_never_touches_a_real_slot(be: JaxBackend, n: int) -> None:
    rng = np.random.default_rng(2)
    dtype = DType.float16
    pool, host = filled_pool(be, dtype, rng)
    want = host.reshape(2, -1, H, D).copy()
    # The last n slots: padding (-1) that wrapped around would hit exactly these.
    slots = np.arange(NB * BS - n, NB * BS)[::-1].copy()
    k, v = random_bits(rng, (n, H, D), dtype), random_bits(rng, (n, H, D), dtype)
    assert be.index_array(slots, CPU).bucket == 8
    pool = be.scatter(pool, be.index_array(slots, CPU), (native(be, k, dtype),
                                                          native(be, v, dtype)))
    want[0, slots], want[1, slots] = k, v
    assert np.array_equal(bits(pool).reshape(want.shape), want)
    # Block copies pad too: one block copied, every other block (0 and the last
    # included) unchanged.
    blocks = want.reshape(2, NB, BS, H, D).copy()
    pool = be.copy_blocks(pool, be.index_array(np.array([2]), CPU),
                          be.index_array(np.array([3]), CPU))
    blocks[:, 3] = blocks[:, 2]
    assert np.array_equal(bits(pool), blocks)


def test_a_new_batch_size_inside_a_bucket_reuses_the_compiled_kernels() -> None:
    kernels = Kernels()  # its own jit objects: compilation counts of this test only
    be = JaxBackend(kernels=kernels)
    rng = np.random.default_rng(3)
    dtype = DType.float16
    pool = be.allocate_layer(16, BS, H, D, dtype, CPU)  # (the self-check compiles too)

    def step(n: int) -> None:
        nonlocal pool
        slots = rng.permutation(16 * BS)[:n]
        rows = (native(be, random_bits(rng, (n, H, D), dtype), dtype),) * 2
        pool = be.scatter(pool, be.index_array(slots, CPU), rows)
        be.gather(pool, 0, be.index_array(slots, CPU))
        pool = be.copy_blocks(pool, be.index_array(np.arange(n) % 8, CPU),
                              be.index_array(8 + np.arange(n) % 8, CPU))

    before = kernels.cache_sizes()
    step(3)
    first = kernels.cache_sizes()
    assert all(first[k] == before[k] + 1 for k in ("scatter", "gather", "copy_blocks"))
    for n in (5, 8, 1):  # the same bucket (8): nothing new is compiled
        step(n)
    assert kernels.cache_sizes() == first
    step(9)  # the next bucket (16): one more executable each
    after = kernels.cache_sizes()
    assert all(after[k] == first[k] + 1 for k in ("scatter", "gather", "copy_blocks"))


def test_buckets_are_powers_of_two_then_midpoints() -> None:
    assert [bucket(n) for n in (0, 1, 8, 9, 16, 17, 64, 65, 96, 97, 128, 129, 4097)] == \
        [8, 8, 8, 16, 16, 32, 64, 96, 96, 128, 128, 192, 6144]
    for n in range(1, 5000):
        assert n <= bucket(n) and (n <= 64 or bucket(n) < 1.5 * n)


def test_writes_donate_the_pool_and_update_its_buffer_in_place(be: JaxBackend) -> None:
    rng = np.random.default_rng(4)
    pool, _ = filled_pool(be, DType.float32, rng)
    where = pool.unsafe_buffer_pointer()
    rows = (native(be, random_bits(rng, (8, H, D), DType.float32), DType.float32),) * 2
    out = be.scatter(pool, be.index_array(np.arange(8), CPU), rows)
    assert pool.is_deleted() and out.unsafe_buffer_pointer() == where
    out2 = be.copy_blocks(out, be.index_array(np.array([0]), CPU),
                          be.index_array(np.array([1]), CPU))
    assert out.is_deleted() and out2.unsafe_buffer_pointer() == where
    with pytest.raises(ArrayMismatchError, match="donated"):
        be.scatter(pool, be.index_array(np.arange(8), CPU), rows)
    with pytest.raises(ArrayMismatchError, match="deleted"):
        be.to_numpy(pool)


def test_all_layer_forms_are_one_dispatch_and_equal_the_per_layer_ones(
        be: JaxBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    dtype = DType.bfloat16
    filled = [filled_pool(be, dtype, rng) for _ in range(4)]
    pools, hosts = [p for p, _ in filled], [h.copy() for _, h in filled]
    calls: list[str] = []
    for name in ("scatter", "copy_blocks", "transfer_blocks"):
        monkeypatch.setattr(be._k, name, _refuse(name))
    for name in ("scatter_layers", "copy_blocks_layers", "transfer_blocks_layers"):
        monkeypatch.setattr(be._k, name, _counting(getattr(be._k, name), name, calls))
    slots = np.array([22, 3, 9])
    rows = [[random_bits(rng, (3, H, D), dtype) for _ in range(2)] for _ in pools]
    pools = be.scatter_layers(pools, be.index_array(slots, CPU),
                              [[native(be, r, dtype) for r in pair] for pair in rows])
    src, dst = be.index_array(np.array([5]), CPU), be.index_array(np.array([0]), CPU)
    pools = be.copy_blocks_layers(pools, src, dst)
    away = [be.allocate_layer(2, BS, H, D, dtype, CPU) for _ in pools]
    away = be.transfer_blocks_layers(pools, be.index_array(np.array([0]), CPU), away,
                                     be.index_array(np.array([1]), CPU))
    assert calls == ["scatter_layers", "copy_blocks_layers", "transfer_blocks_layers"]
    for pool, moved, host, (k, v) in zip(pools, away, hosts, rows):
        flat = host.reshape(2, -1, H, D)
        flat[0, slots], flat[1, slots] = k, v
        host[:, 0] = host[:, 5]
        assert np.array_equal(bits(pool), host)
        assert np.array_equal(bits(moved)[:, 1], host[:, 0]) and not bits(moved)[:, 0].any()


def _refuse(name: str):  # noqa: ANN202
    def fail(*args: object) -> None:
        raise AssertionError(f"the per-layer kernel {name} ran inside an all-layer form")
    return fail


def _counting(fn, name: str, calls: list[str]):  # noqa: ANN001, ANN202
    def run(*args: object) -> object:
        calls.append(name)
        return fn(*args)
    return run


def test_gather_returns_a_copy_that_later_writes_leave_alone(be: JaxBackend) -> None:
    rng = np.random.default_rng(6)
    pool, host = filled_pool(be, DType.float16, rng)
    ref = host.reshape(2, -1, H, D)
    for slots in (np.arange(4, 12), np.array([4, 5, 6])):  # a bucket length, and not
        idx = be.index_array(slots, CPU)
        before = be.gather(pool, 0, idx)
        assert before.is_ready()  # reads are synchronous
        assert np.array_equal(bits(before), ref[0, slots])
        new = random_bits(rng, (len(slots), H, D), DType.float16)
        pool = be.scatter(pool, idx, (native(be, new, DType.float16),) * 2)
        assert np.array_equal(bits(before), ref[0, slots])  # the read kept what it saw
        ref[:, slots] = new
        assert np.array_equal(bits(be.gather(pool, 0, idx)), new)


def test_index_arrays_copy_their_input_and_check_their_range(be: JaxBackend) -> None:
    ids = np.array([3, 1, 2], np.int64)
    idx = be.index_array(ids, CPU)
    ids[0] = 99
    assert isinstance(idx, JaxIndex) and idx.host.tolist() == [3, 1, 2]
    assert not idx.host.flags.writeable and not np.shares_memory(idx.host, ids)
    assert idx.device.dtype == np.int32 and idx.device.shape == (8,)
    assert np.asarray(idx.device).tolist() == [3, 1, 2] + [-1] * 5
    with pytest.raises(IndexError, match="-1"):
        be.index_array(np.array([0, -1]), CPU)
    with pytest.raises(IndexError, match=str(MAX_SLOTS)):
        be.index_array(np.array([MAX_SLOTS]), CPU)
    pool = be.allocate_layer(NB, BS, H, D, DType.float16, CPU)
    with pytest.raises(IndexError, match=f"slot index {NB * BS}"):
        be.gather(pool, 0, be.index_array(np.array([NB * BS]), CPU))
    with pytest.raises(IndexError, match=f"block index {NB}"):
        be.copy_blocks(pool, be.index_array(np.array([0]), CPU),
                       be.index_array(np.array([NB]), CPU))
    with pytest.raises(TypeError, match="index_array"):
        be.gather(pool, 0, np.array([0]))


def test_pools_beyond_65536_slots_index_every_slot(be: JaxBackend) -> None:
    rng = np.random.default_rng(7)
    blocks = 4400  # 70,400 slots: past uint16 and int16 indices
    pool = be.allocate_layer(blocks, 16, 1, 2, DType.float16, CPU)
    slots = np.array([65535, 65536, 70399, 0, 32768])
    k = random_bits(rng, (5, 1, 2), DType.float16)
    v = random_bits(rng, (5, 1, 2), DType.float16)
    pool = be.scatter(pool, be.index_array(slots, CPU), (native(be, k, DType.float16),
                                                          native(be, v, DType.float16)))
    got = be.gather(pool, 1, be.index_array(slots[::-1].copy(), CPU))
    assert np.array_equal(bits(got), v[::-1])
    pool = be.copy_blocks(pool, be.index_array(np.array([4399]), CPU),
                          be.index_array(np.array([4098]), CPU))
    assert np.array_equal(bits(pool)[0, 4098, 15], k[2])  # slot 70399 -> 65583


def test_rows_must_match_the_pool_exactly(be: JaxBackend) -> None:
    pool = be.allocate_layer(NB, BS, H, D, DType.float16, CPU)
    idx = be.index_array(np.array([0, 1]), CPU)
    f16 = native(be, np.zeros((2, H, D), np.uint16), DType.float16)
    f32 = be.from_numpy(np.zeros((2, H, D), np.float32), DType.float32, CPU)
    with pytest.raises(DtypeMismatchError, match="float32"):
        be.scatter(pool, idx, (f16, f32))
    with pytest.raises(ShapeMismatchError, match=r"\[3, 2, 3\]"):
        be.scatter(pool, be.index_array(np.array([0, 1, 2]), CPU), (f16, f16))
    with pytest.raises(ShapeMismatchError, match="planes"):
        be.scatter(pool, idx, (f16,))
    assert not pool.is_deleted()  # refused before anything was donated


# --- arrays in and out -----------------------------------------------------------------

def test_asarray_passes_jax_arrays_through_and_copies_foreign_ones(be: JaxBackend) -> None:
    x = jnp.arange(6, dtype=jnp.float16).reshape(1, 2, 3)
    assert be.asarray(x, CPU) is x
    host = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    y = be.asarray(host, CPU)
    assert y.dtype == np.float32 and y.unsafe_buffer_pointer() != host.ctypes.data
    host[...] = -1  # the caller reuses its buffer: what was imported must not change
    assert np.asarray(y).ravel().tolist() == [0, 1, 2, 3, 4, 5]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.randn(3, 2, 3).to(dtype)
        got = be.asarray(t, CPU)
        assert got.dtype.itemsize == t.element_size() and str(got.dtype) == str(dtype)[6:]
        raw = t.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy()
        assert np.array_equal(bits(got), raw.view(bits(got).dtype))
    reversed_view = np.arange(6, dtype=np.float16)[::-1].reshape(2, 3)
    assert np.asarray(be.asarray(reversed_view, CPU)).tolist() == reversed_view.tolist()


def test_asarray_refuses_with_typed_errors_that_say_why(be: JaxBackend) -> None:
    for junk in ([1.0, 2.0], "abc", None, 3.0):
        with pytest.raises(TypeError):
            be.asarray(junk, CPU)
    with pytest.raises(DtypeMismatchError, match="float64"):
        be.asarray(np.zeros((2, 2)), CPU)
    with pytest.raises(DtypeMismatchError, match="int64"):
        be.asarray(np.zeros(2, np.int64), CPU)
    with pytest.raises(TypeError, match="DLPack.*gradient"):
        be.asarray(torch.ones(2, requires_grad=True), CPU)

    class OnCuda:
        def __dlpack__(self, **kwargs: object) -> object:
            raise AssertionError("must not be exported")

        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 1)

    with pytest.raises(DeviceMismatchError, match="cuda:1.*cpu"):
        be.asarray(OnCuda(), CPU)
    dead = jnp.ones(3)
    dead.delete()
    with pytest.raises(TypeError, match="deleted"):
        be.asarray(dead, CPU)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda a: be.asarray(a, CPU))(jnp.ones(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_round_trip_keeps_every_bit(be: JaxBackend, dtype: DType) -> None:
    raw = random_bits(np.random.default_rng(8), (5, H, D), dtype)
    arr = native(be, raw, dtype)
    assert be.describe(arr) == ((5, H, D), dtype, CPU)
    out = be.to_numpy(arr)
    assert out.flags.writeable and not np.shares_memory(out, np.asarray(arr))
    if dtype is DType.bfloat16:  # widened exactly: the bits move up 16 places
        assert out.dtype == np.float32
        assert np.array_equal(out.view(np.uint32), raw.astype(np.uint32) << 16)
        # ... and a widened bfloat16 (NaN payloads too) narrows back to the same bits
        assert np.array_equal(bits(be.from_numpy(out, dtype, CPU)), raw)
    else:
        assert np.array_equal(out.view(raw.dtype), raw)


def test_from_numpy_rounds_like_numpy_and_describe_reports_other_dtypes(be: JaxBackend) -> None:
    x = np.random.default_rng(9).standard_normal((4, 3)).astype(np.float32)
    assert np.array_equal(bits(be.from_numpy(x, DType.float16, CPU)),
                          x.astype(np.float16).view(np.uint16))
    assert np.array_equal(bits(be.from_numpy(x, DType.bfloat16, CPU)),
                          x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert be.describe(jnp.zeros(2, jnp.int32)) == ((2,), None, CPU)
    with pytest.raises(TypeError):
        be.describe(np.zeros(2, np.float32))
    with pytest.raises(UnsupportedError, match="cuda"):
        be.from_numpy(x, DType.float16, Device("cuda"))


def test_release_layer_frees_the_pool_but_not_a_live_view(be: JaxBackend) -> None:
    pool, host = filled_pool(be, DType.float32, np.random.default_rng(10))
    view = np.from_dlpack(pool)
    be.release_layer(pool)
    assert pool.is_deleted()
    assert np.array_equal(view.view(np.uint32), host)  # JAX kept the viewed buffer
    be.release_layer(pool)  # twice is harmless


def test_synchronize_waits_for_every_write_and_keeps_nothing_alive(be: JaxBackend) -> None:
    import gc
    import weakref
    rng = np.random.default_rng(11)
    pool = be.allocate_layer(128, 16, 8, 64, DType.float32, CPU)
    rows = (native(be, random_bits(rng, (1024, 8, 64), DType.float32), DType.float32),) * 2
    for start in (0, 1024):
        pool = be.scatter(pool, be.index_array(np.arange(start, start + 1024), CPU), rows)
    assert any(ref() is pool for ref in be._outstanding._refs)  # the newest is tracked
    be.synchronize(CPU)
    assert pool.is_ready() and not be._outstanding._refs
    dropped = weakref.ref(be.scatter(pool, be.index_array(np.arange(8), CPU),
                                     tuple(r[:8] for r in rows)))
    gc.collect()
    assert dropped() is None  # the bookkeeping holds no pool alive
    be.synchronize(CPU)


# --- the manager on jax ----------------------------------------------------------------

def _drive(backend: str, dtype: DType, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One script of manager calls; returns every read as host bits."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=H, head_dim=D, dtype=dtype, block_size=BS,
                      num_blocks=24, swap_blocks=12)
    mgr = KvCacheManager(cfg, backend=backend)
    be = mgr.backend

    def arr(name: str) -> object:
        return be.from_numpy(data[name].view(HOST[dtype]) if backend == "jax"
                             else data[name].view(HOST[dtype]), dtype, CPU)

    a = mgr.allocate(AllocationRequest(request_id="a", num_tokens=6))
    b = mgr.allocate(AllocationRequest(request_id="b", num_tokens=3))
    for layer in range(2):
        mgr.write(a, layer, arr(f"a{layer}k"), arr(f"a{layer}v"))
        mgr.write(b, layer, arr(f"b{layer}k"), arr(f"b{layer}v"))
    for step in range(3):  # decode: one write_slots per layer for the batch
        mapping = mgr.extend_batch([a, b], 1)
        for layer in range(2):
            mgr.write_slots(layer, mapping, arr(f"s{step}{layer}k"), arr(f"s{step}{layer}v"))
    c = mgr.fork(a, "c")  # shares a's blocks; c's write copies the last one
    mgr.extend(c, 1)
    for layer in range(2):
        mgr.write(c, layer, arr(f"c{layer}k"), arr(f"c{layer}v"))
    mgr.swap_out(b)
    mgr.swap_in(b)
    mgr.check_invariants()
    out = {}
    for h in (a, b, c):
        for layer in range(2):
            for kv, ref in enumerate(h.kv_cache(layer)):
                host = be.to_numpy(ref.native)
                if dtype is DType.bfloat16:
                    host = (host.view(np.uint32) >> 16).astype(np.uint16)
                out[f"{h.request_id}{layer}{kv}"] = host.view(UINT[dtype])
    out["cow"] = np.array([mgr.stats().copy_on_write_copies])
    return out


def _script_data(dtype: DType) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    data = {}
    for layer in range(2):
        for kv in "kv":
            data[f"a{layer}{kv}"] = random_bits(rng, (6, H, D), dtype)
            data[f"b{layer}{kv}"] = random_bits(rng, (3, H, D), dtype)
            data[f"c{layer}{kv}"] = random_bits(rng, (1, H, D), dtype)
            for step in range(3):
                data[f"s{step}{layer}{kv}"] = random_bits(rng, (2, H, D), dtype)
    return data


@pytest.mark.parametrize("dtype", [DType.float16, DType.float32])
def test_manager_reads_equal_numpys_bit_for_bit(dtype: DType) -> None:
    data = _script_data(dtype)
    on_jax, on_numpy = _drive("jax", dtype, data), _drive("numpy", dtype, data)
    assert on_jax.keys() == on_numpy.keys() and on_jax["cow"][0] == 1  # c's last block
    for name in on_numpy:
        assert np.array_equal(on_jax[name], on_numpy[name]), name


def test_manager_bfloat16_reads_equal_a_dense_reference() -> None:
    data = _script_data(DType.bfloat16)
    got = _drive("jax", DType.bfloat16, data)
    for layer in range(2):
        for kv, name in enumerate("kv"):
            steps = [data[f"s{s}{layer}{name}"] for s in range(3)]
            a = np.concatenate([data[f"a{layer}{name}"]] + [s[:1] for s in steps])
            b = np.concatenate([data[f"b{layer}{name}"]] + [s[1:] for s in steps])
            c = np.concatenate([a, data[f"c{layer}{name}"]])
            for rid, want in (("a", a), ("b", b), ("c", c)):
                assert np.array_equal(got[f"{rid}{layer}{kv}"], want), (rid, layer, name)


def test_handle_reads_come_back_as_jax_arrays() -> None:
    cfg = CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D, dtype="float32",
                      block_size=BS, num_blocks=NB)
    mgr = KvCacheManager(cfg, backend="jax")
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=5)).as_any(JaxKvCacheHandle)
    assert h.key_array(0) is None and h.kv_arrays(0) is None
    k = np.arange(5 * H * D, dtype=np.float32).reshape(5, H, D)
    mgr.write(h, 0, k, -k)
    keys, values = h.kv_arrays(0)
    assert isinstance(keys, jax.Array) and np.array_equal(np.asarray(h.value_array(0)), -k)
    assert np.array_equal(np.asarray(keys), k)
    assert h.pool_array(0) is mgr.layer_pool(0).native


def test_a_pool_view_is_a_snapshot_and_layer_pool_is_always_current() -> None:
    """What a view of ``layer_pool`` guarantees with immutable pools (README, docs)."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D, dtype="float32",
                      block_size=BS, num_blocks=NB)
    mgr = KvCacheManager(cfg, backend="jax")
    h = mgr.allocate(AllocationRequest(request_id="r", num_tokens=2))
    first = np.ones((2, H, D), np.float32)
    mgr.write(h, 0, first, first)
    slots = h.block_table().slots(0, 2)
    old_ref = mgr.layer_pool(0)
    old_numpy = np.from_dlpack(old_ref)  # zero-copy views held across the next write
    old_torch = torch.from_dlpack(old_ref)
    mgr.write(h, 0, 2 * first, 2 * first, start=0)
    # layer_pool again: the current pool, holding the write.
    now = np.from_dlpack(mgr.layer_pool(0)).reshape(2, -1, H, D)
    assert (now[:, slots] == 2).all()
    del now  # (a live view would keep the next write from donating this pool)
    # The older views: unchanged snapshots, still readable (JAX declined to donate a
    # buffer with external references and wrote into a new one).
    assert (old_numpy.reshape(2, -1, H, D)[:, slots] == 1).all()
    assert (old_torch.reshape(2, -1, H, D)[:, slots] == 1).all()
    # With no view holding it, the next write donates the pool: the older jax array
    # is deleted, and using it is a clear error, never stale or changing data.
    held = mgr.layer_pool(0)
    mgr.write(h, 0, 3 * first, 3 * first, start=0)
    assert held.native.is_deleted()
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(held.native)
    with pytest.raises(RuntimeError, match="deleted"):
        np.from_dlpack(held)
    assert (np.from_dlpack(mgr.layer_pool(0)).reshape(2, -1, H, D)[:, slots] == 3).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_attention_on_a_jax_pool_matches_numpy(dtype: str) -> None:
    rng = np.random.default_rng(13)
    lengths = [7, 13, 1]
    managers = {}
    for backend in ("numpy", "jax"):
        cfg = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, dtype=dtype, block_size=4,
                          num_blocks=32)
        managers[backend] = KvCacheManager(cfg, backend=backend)
    handles: dict[str, list] = {"numpy": [], "jax": []}
    for i, n in enumerate(lengths):
        k = rng.standard_normal((n, 2, 8)).astype(dtype)
        v = rng.standard_normal((n, 2, 8)).astype(dtype)
        for backend, mgr in managers.items():
            h = mgr.allocate(AllocationRequest(request_id=f"s{i}", num_tokens=n))
            mgr.write(h, 0, k, v)
            handles[backend].append(h)
    q = rng.standard_normal((3, 1, 4, 8)).astype(dtype)
    want = paged_attention(q, managers["numpy"].layer_pool(0),
                           managers["numpy"].vllm_block_table(handles["numpy"]))
    mgr = managers["jax"]
    got = paged_attention(mgr.backend.asarray(q, CPU), mgr.layer_pool(0),
                          mgr.vllm_block_table(handles["jax"]))
    assert isinstance(got, jax.Array) and got.shape == (3, 1, 4, 8)
    tol = 2e-5 if dtype == "float32" else 5e-3
    np.testing.assert_allclose(np.asarray(got, np.float64), want.astype(np.float64),
                               atol=tol, rtol=tol)


# --- the conformance suite and the bench -----------------------------------------------

@pytest.mark.slow
def test_conformance_suite_passes_on_jax(pytester: pytest.Pytester) -> None:
    kvcore.get_backend("jax")  # installed in CI: its absence fails here
    reprec = pytester.inline_run("-p", "no:cacheprovider", "--pyargs", "kvcore_conformance.tests",
                                 "--kv-backend", "jax")
    failed = [r.nodeid for r in reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert reprec.ret == pytest.ExitCode.OK, failed
    passed = [r.nodeid for r in reprec.getreports("pytest_runtest_logreport")
              if r.passed and r.when == "call"]
    assert len(passed) >= 90, f"only {len(passed)} tests passed"
    assert any("bfloat16" in n for n in passed)


@pytest.mark.slow
def test_bench_measures_jax_and_waits_for_its_writes(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcore.bench import main
    assert main(["--quick", "--json", "-q", "-b", "numpy,jax", "-w", "append,read,fork"]) == 0
    doc = json.loads(capsys.readouterr().out)
    results = {(r["workload"], r["backend"]): r for r in doc["results"]}
    append = results[("append", "jax")]
    step = append["figures"]["decode_step_s"]
    assert step["value"] > 0 and step["baseline"] > 0
    assert "scatter" in step["baseline_label"]  # immutable arrays: no slice assignment
    assert append["details"]["first_decode_step_s"] > 0
    assert results[("read", "jax")]["figures"]["read_GBps"]["value"] > 0
    assert results[("fork", "jax")]["figures"]["blocks_copied_per_child"]["value"] == 1
    assert results[("append", "numpy")]["figures"]["decode_step_s"]["baseline_label"] == \
        "dense slice assignment"
