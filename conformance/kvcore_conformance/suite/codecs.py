"""Quantized KV codecs on the backend: the storage dtypes of their pools, each served
codec's round-trip error against the bound it declares, and the bit-exact rule
applied to what a codec cache stores (codes and scales).

A backend serves the codecs it declares in ``BackendCapabilities.codecs``; the others
are skipped, with the reason it declares in ``unsupported_codecs``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kvcore
from kvcore import DType, KvCacheManager, PagedKvCacheHandle
from kvcore.errors import InvariantError

from .._backends import capability_skip
from .._clauses import (CODEC_CODES, CODEC_ROUND_TRIP, CODEC_STORAGE, blame, check, check_equal,
                        fail)
from .._codec_ref import as_compute, decode
from ._base import ContractTests, covers
from ._harness import Harness

__all__ = ["CodecContract"]


BS = 4
HEADS, DIM = 2, 16
_STORAGE = (DType.uint8, DType.int8)


def _check_invariants(mgr: KvCacheManager, item: Any, what: str) -> None:
    try:
        mgr.check_invariants()
    except InvariantError as exc:
        fail(item, f"{what}: check_invariants() raised: {exc}")


def _host_dtype(dtype: DType) -> np.dtype:
    return np.dtype({DType.uint8: np.uint8, DType.int8: np.int8, DType.float32: np.float32,
                     DType.float16: np.float16}.get(dtype, np.float32))


def _same(item: Any, got: Any, want: np.ndarray, what: str) -> None:
    """Bit-identical host arrays of the same dtype and shape (NaN as NaN when floats)."""
    if not isinstance(got, np.ndarray):
        fail(item, f"{what}: not a numpy array", seen=type(got).__name__)
    check_equal((got.dtype, got.shape), (want.dtype, want.shape), item,
                f"{what}: (dtype, shape)")
    if want.dtype.kind == "f":
        nan = np.isnan(want)
        same = np.array_equal(np.isnan(got), nan) and np.array_equal(
            got[~nan].view(f"u{want.itemsize}"), want[~nan].view(f"u{want.itemsize}"))
    else:
        same = np.array_equal(got.view(np.uint8), want.view(np.uint8))
    if not same:
        bad = np.flatnonzero((got != want).reshape(-1) & ~(np.isnan(got) & np.isnan(want))
                             .reshape(-1)) if want.dtype.kind == "f" else \
            np.flatnonzero((got != want).reshape(-1))
        fail(item, f"{what}: {bad.size} of {want.size} elements differ, first at flat "
             f"index {bad[:1].tolist()}", seen=got.reshape(-1)[bad[:6]].tolist(),
             expected=want.reshape(-1)[bad[:6]].tolist())


# --- data -----------------------------------------------------------------------------------

#: Exponent ranges of ordinary rows per compute dtype (row scale, spread in a row).
_EXPONENTS = {DType.float16: (-8, 12), DType.bfloat16: (-60, 60), DType.float32: (-60, 60)}
#: The smallest subnormal and a large finite value of each compute dtype.
_EDGES = {DType.float16: (2.0 ** -24, 65504.0), DType.bfloat16: (2.0 ** -133, 3.3895e38),
          DType.float32: (2.0 ** -149, 2.0 ** 120)}


def codec_rows(rng: np.random.Generator, n: int, compute: DType) -> tuple[np.ndarray, np.ndarray]:
    """``[n, HEADS, DIM]`` host rows of ``compute`` for a codec round trip, and which
    (token, head) rows hold a non-finite value.  Rows of ordinary values have their own
    magnitude and spread (2**-7 .. 1 of the row's largest); the first rows are the edge
    cases: zeros, signed zeros and subnormals, the largest finite values, an
    infinity, a NaN."""
    lo, hi = _EXPONENTS[compute]
    base = rng.uniform(lo, hi, size=(n, HEADS, 1))
    exps = base - rng.uniform(0, 7, size=(n, HEADS, DIM))
    x = np.sign(rng.uniform(-1, 1, (n, HEADS, DIM))) * np.exp2(exps) \
        * rng.uniform(1, 2, (n, HEADS, DIM))
    tiny, big = _EDGES[compute]
    specials = [np.zeros(DIM), np.array([-0.0, 0.0] * (DIM // 2)),
                tiny * rng.integers(-3, 4, DIM), np.full(DIM, -big) * rng.uniform(0.5, 1, DIM),
                np.where(np.arange(DIM) == 3, np.inf, 1.0), np.where(np.arange(DIM) == 5, np.nan,
                                                                     -2.0)]
    for i, row in enumerate(specials[:min(len(specials), n * HEADS)]):
        x[i // HEADS, i % HEADS] = row
    x[0, 0, 0] = big  # the largest finite value itself
    host = as_compute(x.astype(np.float32), compute)
    finite = np.isfinite(host).all(axis=-1)
    return host, ~finite


class CodecContract(ContractTests):
    """Storage of code and scale pools, and every served codec through the manager."""

    @covers(CODEC_STORAGE)
    def test_code_and_scale_pools_carry_every_byte(self, kvcore_backend: Any,
                                                   kvcore_device: Any) -> None:
        be = kvcore_backend
        caps = be.capabilities()
        stores = [d for d in _STORAGE if d in caps.dtypes]
        if not stores:
            capability_skip("dtypes", f"backend {be.name!r} declares neither uint8 nor int8 "
                            "pools, so it serves no codec")
        swaps = [kvcore.Device(t) for t in caps.swap_device_types]
        nb = 6
        for dtype in [*stores, DType.float32]:
            dim = 1 if dtype is DType.float32 else 8
            host_t = _host_dtype(dtype)
            for planes in (2, 1):
                what = f"a {dtype.value} pool [{planes}, {nb}, {BS}, 2, {dim}] on {kvcore_device}"
                with blame(CODEC_STORAGE, f"allocate_layer of {what}"):
                    pool = be.allocate_layer(nb, BS, 2, dim, dtype, kvcore_device,
                                             planes=planes)
                    shape, got_dtype, _ = be.describe(pool)
                check_equal((tuple(shape), got_dtype), ((planes, nb, BS, 2, dim), dtype),
                            CODEC_STORAGE, f"describe(allocate_layer) of {what}")
                mirror = np.zeros((planes, nb * BS, 2, dim), host_t)
                with blame(CODEC_STORAGE, f"to_numpy of {what}"):
                    be.synchronize(kvcore_device)
                    _same(CODEC_STORAGE, be.to_numpy(pool).reshape(mirror.shape), mirror,
                          f"a fresh {what} (must be zero)")
                slots = np.random.default_rng(planes).permutation(nb * BS)[:16 if dim == 8 else 24]
                if dtype is DType.float32:  # every float32 byte pattern class is bits.*'s
                    rows = [np.random.default_rng(p).standard_normal((slots.size, 2, dim))
                            .astype(np.float32) for p in range(planes)]
                else:
                    values = np.arange(256, dtype=np.int64) - (128 if dtype is DType.int8 else 0)
                    rows = [np.roll(values, 37 * p).astype(host_t).reshape(slots.size, 2, dim)
                            for p in range(planes)]
                with blame(CODEC_STORAGE, f"scatter into {what}"):
                    natives = [be.from_numpy(r, dtype, kvcore_device) for r in rows]
                    pool = be.scatter(pool, be.index_array(slots, kvcore_device), natives)
                for p in range(planes):
                    mirror[p, slots] = rows[p]
                order = slots[::-1].copy()
                for p in range(planes):
                    with blame(CODEC_STORAGE, f"gather of plane {p} of {what}"):
                        out = be.gather(pool, p, be.index_array(order, kvcore_device))
                        be.synchronize(kvcore_device)
                        got = be.to_numpy(out)
                    _same(CODEC_STORAGE, got, mirror[p, order], f"gather(plane {p}) of {what}")
                src, dst = np.array([1, 3]), np.array([4, 0])
                with blame(CODEC_STORAGE, f"copy_blocks in {what}"):
                    pool = be.copy_blocks(pool, be.index_array(src, kvcore_device),
                                          be.index_array(dst, kvcore_device))
                blocks = mirror.reshape(planes, nb, BS, 2, dim)
                blocks[:, dst] = blocks[:, src]
                for swap in swaps:
                    with blame(CODEC_STORAGE, f"transfer_blocks of {what} to {swap} and back"):
                        other = be.allocate_layer(nb, BS, 2, dim, dtype, swap, planes=planes)
                        ids = be.index_array(np.arange(nb), kvcore_device)
                        other = be.transfer_blocks(pool, ids, other, be.index_array(
                            np.arange(nb)[::-1].copy(), swap))
                        be.synchronize(swap)
                        pool = be.transfer_blocks(other, be.index_array(
                            np.arange(nb)[::-1].copy(), swap), pool, ids)
                        be.synchronize(kvcore_device)
                        be.release_layer(other)
                with blame(CODEC_STORAGE, f"to_numpy of {what}"):
                    be.synchronize(kvcore_device)
                    _same(CODEC_STORAGE, be.to_numpy(pool).reshape(mirror.shape), mirror,
                          f"{what} after scatter, copy_blocks and transfers")
                be.release_layer(pool)

    @covers(CODEC_ROUND_TRIP)
    def test_codec_round_trip_stays_within_its_declared_bound(
            self, kvcore_harness: Harness, kvcore_codec: DType) -> None:
        h = kvcore_harness
        codec = kvcore.codec_for(kvcore_codec)
        mgr = h.manager(dtype=kvcore_codec, compute_dtype=h.dtype, num_kv_heads=HEADS,
                        head_dim=DIM, block_size=BS, num_blocks=16)
        rng = np.random.default_rng(11)
        handle = h.allocate(mgr, "q", 7)
        data: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {0: [], 1: []}
        for layer in (0, 1):
            (k, kbad), (v, vbad) = codec_rows(rng, 7, h.dtype), codec_rows(rng, 7, h.dtype)
            mgr.write(handle, layer, h.native(k), h.native(v))
            data[layer].append(((k, kbad), (v, vbad)))
        for _ in range(BS + 1):  # decode steps through the write fast path
            mapping = mgr.extend_batch([handle], 1)
            for layer in (0, 1):
                (k, kbad), (v, vbad) = codec_rows(rng, 1, h.dtype), codec_rows(rng, 1, h.dtype)
                mgr.write_slots(layer, mapping, h.native(k), h.native(v))
                data[layer].append(((k, kbad), (v, vbad)))
        for layer in (0, 1):
            for plane, read in ((0, handle.key_cache), (1, handle.value_cache)):
                want = np.concatenate([d[plane][0] for d in data[layer]])
                bad = np.concatenate([d[plane][1] for d in data[layer]])
                what = (f"{'key' if plane == 0 else 'value'}_cache({layer}) of a "
                        f"{kvcore_codec.value} cache computing in {h.dtype.value}")
                ref = read(layer)
                if ref is None:
                    fail(CODEC_ROUND_TRIP, f"{what} returned None")
                h.check_ref(CODEC_ROUND_TRIP, ref, want.shape, what)
                got = h.host(ref).astype(np.float64)
                nan_rows = np.isnan(got).all(axis=-1)
                check(bool(nan_rows[bad].all()), CODEC_ROUND_TRIP,
                      f"{what}: rows holding an infinity or NaN must read back all NaN",
                      seen=got[bad & ~nan_rows][:2].tolist(), expected="NaN rows")
                x = want.astype(np.float64)
                ok = ~bad
                err = np.abs(got - x)[ok]
                bound = codec.error_bound(x, h.dtype)[ok]
                over = ~(err <= bound)
                if over.any():
                    i = int(np.argmax(over))
                    fail(CODEC_ROUND_TRIP, f"{what}: {int(over.sum())} of {over.size} finite "
                         f"elements are outside the codec's declared bound ({codec.precision})",
                         seen=f"written {x[ok][i]!r} read {got[ok][i]!r}: error {err[i]:.6g}",
                         expected=f"error <= {bound[i]:.6g}")
        _check_invariants(mgr, CODEC_ROUND_TRIP, "after the codec's writes")

    @covers(CODEC_CODES)
    def test_codec_reads_decode_the_stored_codes_and_moves_keep_them(
            self, kvcore_harness: Harness, kvcore_codec: DType) -> None:
        h = kvcore_harness
        codec = kvcore.codec_for(kvcore_codec)
        caps = h.backend.capabilities()
        swap = kvcore.Device(caps.swap_device_types[0]) if caps.swap_device_types else None
        mgr = h.manager(dtype=kvcore_codec, compute_dtype=h.dtype, num_kv_heads=HEADS,
                        head_dim=DIM, block_size=BS, num_blocks=24,
                        swap_blocks=12 if swap is not None else 0,
                        **({"swap_device": swap} if swap is not None else {}))
        rng = np.random.default_rng(5)
        prompt = tuple(range(40, 40 + 2 * BS + 1))
        handle = h.allocate(mgr, "c", prompt=prompt)
        for layer in (0, 1):
            mgr.write(handle, layer, h.native(codec_rows(rng, len(prompt), h.dtype)[0]),
                      h.native(codec_rows(rng, len(prompt), h.dtype)[0]))
        mapping = mgr.extend_batch([handle], 1)
        for layer in (0, 1):
            mgr.write_slots(layer, mapping, h.native(codec_rows(rng, 1, h.dtype)[0]),
                            h.native(codec_rows(rng, 1, h.dtype)[0]))

        def reads(hd: PagedKvCacheHandle) -> list[np.ndarray]:
            return [h.host(read(layer)) for layer in (0, 1)
                    for read in (hd.key_cache, hd.value_cache)]

        before = reads(handle)
        slots = handle.block_table().slots()
        for layer in (0, 1):
            pools = mgr.layer_pools(layer)
            check_equal([(tuple(p.shape), p.dtype) for p in pools],
                        [((2, 24, BS, HEADS, DIM), codec.code_dtype),
                         ((2, 24, BS, HEADS, 1), DType.float32)], CODEC_CODES,
                        f"layer_pools({layer}) of a {kvcore_codec.value} cache: (shape, dtype) "
                        "of the codes and of the scales")
            codes, scales = (h.host(p).reshape(2, -1, HEADS, p.shape[-1]) for p in pools)
            for plane in (0, 1):
                want = decode(kvcore_codec, codes[plane, slots], scales[plane, slots], h.dtype)
                _same(CODEC_CODES, before[2 * layer + plane], want,
                      f"the read of plane {plane} of layer {layer} versus the reference decode "
                      "of the codes and scales layer_pools holds")

        def expect(hd: PagedKvCacheHandle, want: list[np.ndarray], what: str,
                   n: int | None = None) -> None:
            for i, (got, w) in enumerate(zip(reads(hd), want)):
                _same(CODEC_CODES, got[:n] if n is not None else got,
                      w[:n] if n is not None else w,
                      f"{what}: {'key' if i % 2 == 0 else 'value'}_cache({i // 2}) of "
                      f"{hd.request_id!r}")

        child = mgr.fork(handle, "c-child")
        mapping = mgr.extend_batch([child], 1)  # copy-on-write of the shared last block
        for layer in (0, 1):
            mgr.write_slots(layer, mapping, h.native(codec_rows(rng, 1, h.dtype)[0]),
                            h.native(codec_rows(rng, 1, h.dtype)[0]))
        expect(handle, before, "the parent after its fork wrote (copy-on-write)")
        expect(child, before, "the fork's shared tokens after copy-on-write",
               n=handle.num_tokens())
        hit = h.allocate(mgr, "c-hit", prompt=prompt)
        cached = hit.num_cached_tokens()
        check(cached >= 2 * BS, CODEC_CODES, "prompt tokens a repeated prompt finds in the "
              "prefix cache", seen=cached, expected=f">= {2 * BS}")
        for layer in (0, 1):
            for plane, read in ((0, hit.key_cache), (1, hit.value_cache)):
                ref = read(layer)
                got = h.host(ref) if ref is not None else None
                _same(CODEC_CODES, got, before[2 * layer + plane][:cached],
                      f"a prefix hit's plane {plane} of layer {layer}")
        if swap is not None:
            mgr.swap_out(handle)
            mgr.swap_in(handle)
            expect(handle, before, f"after swap_out / swap_in via {swap}")
        _check_invariants(mgr, CODEC_CODES, "after copy-on-write, sharing and swap")
