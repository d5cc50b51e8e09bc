"""Quantized KV codecs: the codec arithmetic on numpy and torch, its declared bounds,
non-finite rows, the config and sizes, and codec caches through the manager."""

from __future__ import annotations

import warnings

import numpy as np
import pydantic
import pytest
import torch

import kvcore
from kvcore import AllocationRequest, CacheConfig, DType, KvCacheManager, codec_for
from kvcore._array_ops import ArrayOps
from kvcore.errors import DtypeMismatchError, UnsupportedError
from kvcore.stores import layout_fingerprint

CODECS = (DType.float8_e4m3, DType.float8_e5m2, DType.int8)
COMPUTE = (DType.float16, DType.bfloat16, DType.float32)
BACKENDS = ("numpy", "torch")


def ops(name: str) -> ArrayOps:
    return kvcore.get_backend(name).array_ops()


def values(rng: np.random.Generator, n: int, compute: DType) -> np.ndarray:
    """[n, 4, 32] rows of mixed magnitudes (2**-30 .. 2**10 between rows, 2**-8 within)."""
    scale = np.exp2(rng.uniform(-8 if compute is DType.float16 else -30, 10, (n, 4, 1)))
    x = rng.standard_normal((n, 4, 32)) * scale
    return host(x, compute)


def host(x: np.ndarray, compute: DType) -> np.ndarray:
    """Host values representable in ``compute`` (bfloat16 as float32 with 16 zero bits)."""
    if compute is DType.float16:
        return x.astype(np.float16)
    x32 = x.astype(np.float32)
    if compute is DType.bfloat16:
        return (x32.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return x32


def native(name: str, x: np.ndarray, compute: DType):
    return kvcore.get_backend(name).from_numpy(x, compute, kvcore.Device("cpu"))


def to_host(name: str, a) -> np.ndarray:
    return kvcore.get_backend(name).to_numpy(a)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_stays_within_the_declared_bound(backend, codec, compute):
    c = codec_for(codec)
    x = values(np.random.default_rng(3), 400, compute)
    o = ops(backend)
    codes, scales = c.encode(o, native(backend, x, compute))
    back = to_host(backend, c.decode(o, codes, scales, compute)).astype(np.float64)
    err = np.abs(back - x.astype(np.float64))
    bound = c.error_bound(x, compute)
    assert (err <= bound).all()
    # The bound is tight (within 2x of the worst error seen): a codec rounding toward
    # zero instead of to nearest would exceed it.
    assert (err / bound).max() > 0.5


@pytest.mark.parametrize("codec", CODECS)
def test_numpy_and_torch_store_the_same_codes_and_scales(codec):
    c = codec_for(codec)
    x = values(np.random.default_rng(4), 300, DType.float16)
    out = {}
    for backend in BACKENDS:
        codes, scales = c.encode(ops(backend), native(backend, x, DType.float16))
        out[backend] = (to_host(backend, codes), to_host(backend, scales))
    (nc, ns), (tc, ts) = out["numpy"], out["torch"]
    assert nc.dtype == tc.dtype == np.dtype(c.code_dtype.value)
    assert np.array_equal(nc.view(np.uint8), tc.view(np.uint8))
    assert np.array_equal(ns.view(np.uint32), ts.view(np.uint32))


def test_truncation_instead_of_rounding_breaks_the_int8_bound():
    class Trunc(type(ops("numpy"))):  # type: ignore[misc]
        def rint(self, a):
            return np.trunc(a)

    c = codec_for(DType.int8)
    base = ops("numpy")
    x = values(np.random.default_rng(5), 200, DType.float32)
    codes, scales = c.encode(Trunc(np, dtypes=base.dtypes), x)
    back = c.decode(base, codes, scales, DType.float32).astype(np.float64)
    assert not (np.abs(back - x) <= c.error_bound(x, DType.float32)).all()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_read_nan_and_leave_other_rows_alone(backend, codec):
    c = codec_for(codec)
    x = np.ones((4, 2, 8), np.float16)
    x[0, 1, 3] = np.inf
    x[1, 0, 0] = -np.inf
    x[2, 1, 7] = np.nan
    x[3] = 0
    x[3, 0, 2] = -0.0
    o = ops(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IEEE results, no numpy warnings on the way
        codes, scales = c.encode(o, native(backend, x, DType.float16))
        back = to_host(backend, c.decode(o, codes, scales, DType.float16))
    bad = np.zeros((4, 2), bool)
    bad[0, 1] = bad[1, 0] = bad[2, 1] = True
    assert np.isnan(back[bad]).all()
    assert not np.isnan(back[~bad]).any()
    np.testing.assert_array_equal(back[0, 0], 1.0)
    np.testing.assert_array_equal(back[3], 0.0)  # zeros stay zeros (signs are not kept)
    assert (to_host(backend, codes)[bad] == 0).all()


def test_array_ops_without_codec_operations_say_what_is_missing():
    class Old(ArrayOps):  # written before the codecs: only the attention operations
        name = "old"
        from_host = take1 = float32 = cast_like = permute = where = amax = sum = \
            exp = isfinite = device_key = lambda *a: None  # noqa: E731

    with pytest.raises(UnsupportedError, match="the old array operations \\(Old\\) have no "
                                               "'divide'"):
        Old().divide(1, 2)
    with pytest.raises(UnsupportedError, match="float8_bits\\(float8_e5m2\\)"):
        Old().float8_bits(1, DType.float8_e5m2)


# --- config and sizes ---------------------------------------------------------------------

SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=16)


def test_compute_dtype_defaults_to_float16_for_codecs_and_to_the_dtype_otherwise():
    assert CacheConfig(**SHAPE, dtype="int8").compute_dtype is DType.float16
    assert CacheConfig(**SHAPE, dtype="fp8", compute_dtype="bf16").compute_dtype is DType.bfloat16
    assert CacheConfig(**SHAPE, dtype="bfloat16").compute_dtype is DType.bfloat16
    cfg = CacheConfig(**SHAPE, dtype="float8_e5m2")
    assert CacheConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("fields, message", [
    (dict(dtype="float32", compute_dtype="float16"), "compute_dtype='float16' differs from "
                                                     "dtype='float32'"),
    (dict(dtype="int8", compute_dtype="int8"), "compute_dtype must be float16, bfloat16 or "
                                               "float32"),
    (dict(dtype="uint8"), "'uint8' is a storage type of codec pools, not a cache dtype"),
])
def test_config_refuses_dtypes_that_do_not_fit(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        CacheConfig(**SHAPE, **fields)


@pytest.mark.parametrize("codec", CODECS)
def test_sizes_count_one_byte_per_element_plus_a_float32_scale_per_head(codec):
    cfg = CacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=4, dtype=codec)
    assert cfg.bytes_per_token == 32 * 2 * 8 * (128 + 4) == \
        kvcore.bytes_per_token(32, 8, 128, codec)
    fp16 = CacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=4)
    assert fp16.bytes_per_token / cfg.bytes_per_token == pytest.approx(256 / 132)
    budget = CacheConfig.from_memory_budget(2**30, num_layers=32, num_kv_heads=8,
                                            head_dim=128, dtype=codec)
    assert budget.total_bytes <= 2**30 < budget.total_bytes + budget.bytes_per_block


def test_store_fingerprints_tell_codecs_apart_but_not_compute_dtypes():
    f16 = CacheConfig(**SHAPE)
    int8 = CacheConfig(**SHAPE, dtype="int8")
    int8_bf16 = CacheConfig(**SHAPE, dtype="int8", compute_dtype="bfloat16")
    assert layout_fingerprint(f16) != layout_fingerprint(int8)
    assert layout_fingerprint(int8) == layout_fingerprint(int8_bf16)


# --- through the manager -------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_codec_cache_writes_and_reads_in_its_compute_dtype(backend, codec):
    cfg = CacheConfig(**SHAPE, dtype=codec, swap_blocks=8)
    mgr = KvCacheManager(cfg, backend)
    c = codec_for(codec)
    rng = np.random.default_rng(0)
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=5))
    want = {}
    for layer in range(2):
        k, v = (host(rng.standard_normal((5, 2, 8)), DType.float16) for _ in range(2))
        mgr.write(h, layer, native(backend, k, DType.float16), native(backend, v, DType.float16))
        want[layer] = [k, v]
    for _ in range(3):  # decode steps through the write fast path
        slots = mgr.extend_batch([h], 1)
        for layer in range(2):
            k, v = (host(rng.standard_normal((1, 2, 8)), DType.float16) for _ in range(2))
            mgr.write_slots(layer, slots, native(backend, k, DType.float16),
                            native(backend, v, DType.float16))
            want[layer] = [np.concatenate([want[layer][0], k]), np.concatenate([want[layer][1], v])]
    for layer in range(2):
        for plane, ref in enumerate(h.kv_cache(layer)):
            assert (ref.dtype, ref.shape) == (DType.float16, (8, 2, 8))
            x = want[layer][plane]
            err = np.abs(to_host(backend, ref.native).astype(np.float64) - x)
            assert (err <= c.error_bound(x, DType.float16)).all()
    codes, scales = mgr.layer_pools(0)
    assert (codes.dtype, codes.shape) == (c.code_dtype, (2, 16, 4, 2, 8))
    assert (scales.dtype, scales.shape) == (DType.float32, (2, 16, 4, 2, 1))
    with pytest.raises(UnsupportedError, match="layer 0 of a .* cache keeps its codes and its "
                                               "scales in separate pools; use layer_pools"):
        mgr.layer_pool(0)
    before = [to_host(backend, r.native) for r in h.kv_cache(1)]
    mgr.swap_out(h)
    mgr.swap_in(h)
    after = [to_host(backend, r.native) for r in h.kv_cache(1)]
    assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16))
               for a, b in zip(before, after))
    assert h.stats().memory_bytes == 2 * cfg.bytes_per_block
    mgr.check_invariants()


def test_a_codec_cache_refuses_codes_and_other_floats_without_casting():
    mgr = KvCacheManager(CacheConfig(**SHAPE, dtype="int8"), "numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=1))
    for wrong in (np.zeros((1, 2, 8), np.int8), np.zeros((1, 2, 8), np.float32)):
        with pytest.raises(DtypeMismatchError, match="the cache holds int8 codes written and "
                                                     "read as float16"):
            mgr.write(h, 0, wrong, wrong)
    assert h.num_written(0) == 0


def test_cache_files_refuse_codec_caches(tmp_path):
    mgr = KvCacheManager(CacheConfig(**SHAPE, dtype="float8_e4m3"), "numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=1))
    with pytest.raises(UnsupportedError, match="the float8_e4m3 codec"):
        mgr.save(tmp_path / "c.safetensors", [h])
    assert not (tmp_path / "c.safetensors").exists()


def test_a_config_of_layer_groups_quantizes_every_group():
    from kvcore.models import LayerGroup
    cfg = CacheConfig(**SHAPE, dtype="int8",
                      layer_groups=(LayerGroup(kind="latent", layers=(0,), latent_dim=12),
                                    LayerGroup(layers=(1,), v_head_dim=4)))
    mgr = KvCacheManager(cfg, "torch")
    assert [tuple(p.shape) for p in mgr.layer_pools(0)] == [(1, 16, 4, 1, 12), (1, 16, 4, 1, 1)]
    assert [tuple(p.shape) for p in mgr.layer_pools(1)] == \
        [(1, 16, 4, 2, 8), (1, 16, 4, 2, 4), (2, 16, 4, 2, 1)]
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=3))
    lat = torch.randn(3, 1, 12, dtype=torch.float16)
    mgr.write(h, 0, lat, None)
    k, v = torch.randn(3, 2, 8, dtype=torch.float16), torch.randn(3, 2, 4, dtype=torch.float16)
    mgr.write(h, 1, k, v)
    assert h.value_cache(0) is None
    c = codec_for(DType.int8)
    for got, x in ((h.key_cache(0), lat), (h.key_cache(1), k), (h.value_cache(1), v)):
        err = (got.native.double() - x.double()).abs().numpy()
        assert (err <= c.error_bound(x.numpy(), DType.float16)).all()
    assert cfg.bytes_per_token == 1 * (12 + 4) + 2 * (8 + 4 + 2 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_append_bench_runs_a_codec_cache_and_checks_its_reads(capsys, backend):
    import json

    from kvcore.bench import main
    assert main(["--quick", "--json", "-w", "append,read", "-b", backend, "--dtype", "int8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [append] = [r for r in doc["results"] if r["workload"] == "append"]
    assert append["details"]["shape"]["dtype"] == "int8"
    assert append["figures"]["decode_step_s"]["value"] > 0
