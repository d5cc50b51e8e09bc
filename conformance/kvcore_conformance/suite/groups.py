"""Layer groups on the backend: sliding windows, latent (MLA) layers, K and V of
different widths, cross-attention.

The manager keeps a block table per group and the backend one pool layout per group
(one-plane pools of one head for latent layers, one pool per plane when V's width
differs from K's, a separate small pool per group).  These tests drive every group
kind through the manager, as an engine would, and compare each read with a dense
reference bit for bit.
"""

# The lambdas handed to expect_raises are called at once, inside the iteration that
# built them, so late binding of loop variables cannot bite.
# ruff: noqa: B023

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kvcore import KvCacheManager, PagedKvCacheHandle
from kvcore.errors import CapacityError, InvariantError, UnsupportedError
from kvcore.models import LayerGroup

from .._clauses import (GROUPS_CROSS, GROUPS_KV_WIDTHS, GROUPS_LATENT, GROUPS_SLIDING, check,
                        check_equal, expect_raises, fail)
from .._data import assert_same_bits, hashed_kv
from ._base import ContractTests, covers
from ._harness import Harness

__all__ = ["LayerGroupContract"]


BS = 4


def _check_invariants(mgr: KvCacheManager, item: Any, what: str) -> None:
    try:
        mgr.check_invariants()
    except InvariantError as exc:
        fail(item, f"{what}: check_invariants() raised: {exc}")


class _Written:
    """What each layer of one sequence must read back: host rows per plane."""

    def __init__(self, layers: int, planes: int) -> None:
        self.rows: dict[int, list[list[np.ndarray]]] = {
            layer: [[] for _ in range(planes)] for layer in range(layers)}

    def add(self, layer: int, *rows: np.ndarray) -> None:
        for plane, r in enumerate(rows):
            self.rows[layer][plane].append(r)

    def plane(self, layer: int, plane: int) -> np.ndarray:
        return np.concatenate(self.rows[layer][plane])

    def copy(self) -> _Written:
        other = _Written(0, 0)
        other.rows = {layer: [list(p) for p in planes] for layer, planes in self.rows.items()}
        return other


def _rows(h: Harness, n: int, heads: int, dim: int) -> np.ndarray:
    keys = h.rng.integers(0, 2**62, size=n, dtype=np.int64)
    return hashed_kv(keys, heads, dim, h.dtype)


def _expect(h: Harness, item: Any, handle: PagedKvCacheHandle, layer: int, plane: int,
            want: np.ndarray | None, what: str) -> None:
    """``handle`` reads ``want`` for ``plane`` of ``layer`` (``None``: reads nothing)."""
    name = "key_cache" if plane == 0 else "value_cache"
    ref = handle.key_cache(layer) if plane == 0 else handle.value_cache(layer)
    label = f"{what}: {name}({layer}) of {handle.request_id!r}"
    if want is None:
        check(ref is None, item, f"{label} must be None", seen=ref, expected=None)
        return
    if ref is None:
        fail(item, f"{label} returned None", expected=f"{len(want)} tokens")
    h.check_ref(item, ref, want.shape, label)
    assert_same_bits(item, h.host(ref), want, h.dtype, label)


def _step(h: Harness, mgr: KvCacheManager, handles: list[PagedKvCacheHandle],
          written: dict[str, _Written], shapes: dict[int, tuple[tuple[int, int], ...]],
          skip: tuple[int, ...] = ()) -> None:
    """One decode step for ``handles``: extend_batch, then write_slots of every layer
    (but ``skip``) with fresh rows of each layer's plane shapes."""
    mapping = mgr.extend_batch(handles, 1)
    n = len(handles)
    for layer, plane_shapes in shapes.items():
        if layer in skip:
            continue
        rows = [_rows(h, n, heads, dim) for heads, dim in plane_shapes]
        natives = [h.native(r) for r in rows]
        mgr.write_slots(layer, mapping, natives[0], natives[1] if len(natives) > 1 else None)
        for i, handle in enumerate(handles):
            written[handle.request_id].add(layer, *(r[i:i + 1] for r in rows))


def _prefill(h: Harness, mgr: KvCacheManager, handle: PagedKvCacheHandle,
             shapes: dict[int, tuple[tuple[int, int], ...]], written: _Written,
             start: int = 0, skip: tuple[int, ...] = ()) -> None:
    n = handle.num_tokens() - start
    for layer, plane_shapes in shapes.items():
        if layer in skip:
            continue
        rows = [_rows(h, n, heads, dim) for heads, dim in plane_shapes]
        natives = [h.native(r) for r in rows]
        mgr.write(handle, layer, natives[0], natives[1] if len(natives) > 1 else None,
                  start=start)
        written.add(layer, *rows)


def _fork_and_write(h: Harness, mgr: KvCacheManager, handle: PagedKvCacheHandle,
                    written: dict[str, _Written],
                    shapes: dict[int, tuple[tuple[int, int], ...]],
                    expect_all: Callable[[PagedKvCacheHandle, _Written, str], None],
                    skip: tuple[int, ...] = (),
                    child_what: str = "the fork after copy-on-write") -> None:
    """Fork ``handle``, write one decode step into the child (copying the shared last
    blocks), and check both read what each was written."""
    name = handle.request_id
    child = mgr.fork(handle, f"{name}-child")
    written[child.request_id] = written[name].copy()
    _step(h, mgr, [child], written, shapes, skip=skip)
    expect_all(handle, written[name], "the parent after its fork wrote")
    expect_all(child, written[child.request_id], child_what)


def _swap_round_trip(mgr: KvCacheManager, handle: PagedKvCacheHandle, swap: Any,
                     written: _Written,
                     expect_all: Callable[[PagedKvCacheHandle, _Written, str], None]) -> None:
    """Swap ``handle`` out and back in (when the backend has a swap device) and check
    it reads what it was written."""
    if swap is None:
        return
    mgr.swap_out(handle)
    mgr.swap_in(handle)
    expect_all(handle, written, f"after swap_out / swap_in via {swap}")


def _swap_device(h: Harness) -> Any:
    types = h.backend.capabilities().swap_device_types
    if not types:
        return None
    from kvcore import Device
    return Device(types[0])


class LayerGroupContract(ContractTests):
    """Every layer-group kind through the manager on this backend."""

    @covers(GROUPS_SLIDING)
    def test_sliding_window_holds_its_window_and_gives_old_blocks_back(
            self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        window = 6
        swap = _swap_device(h)
        mgr = h.manager(num_layers=2, block_size=BS, num_blocks=48,
                        swap_blocks=24 if swap is not None else 0,
                        **({"swap_device": swap} if swap is not None else {}),
                        layer_groups=(LayerGroup(kind="sliding", layers=(0,), window=window),
                                      LayerGroup(layers=(1,))))
        shapes = {layer: ((h.heads, h.dim),) * 2 for layer in (0, 1)}
        handle = h.allocate(mgr, "w", 3)
        written = {"w": _Written(2, 2)}
        _prefill(h, mgr, handle, shapes, written["w"])
        bound = -(-window // BS) + 1
        for step in range(26):
            _step(h, mgr, [handle], written, shapes)
            held = mgr.flashinfer_page_table([handle], group=0).indices
            held = int(np.count_nonzero(np.asarray(held) >= 0))
            check(held <= bound, GROUPS_SLIDING, f"blocks of the sliding group held after "
                  f"{handle.num_tokens()} tokens (window {window}, block size {BS})",
                  seen=held, expected=f"<= {bound}")
        def expect_all(hd: PagedKvCacheHandle, w: _Written, what: str) -> None:
            n = hd.num_tokens()
            first = hd.first_position(0)
            check(0 < first <= n - window and first % BS == 0, GROUPS_SLIDING,
                  f"{what}: first_position(0) of the sliding layer after {n} tokens",
                  seen=first, expected=f"a block boundary in 1..{n - window}")
            check_equal(hd.first_position(1), 0, GROUPS_SLIDING,
                        f"{what}: first_position(1) of the full-attention layer")
            for plane in (0, 1):
                _expect(h, GROUPS_SLIDING, hd, 0, plane, w.plane(0, plane)[first:],
                        f"{what}: the sliding layer's window")
                _expect(h, GROUPS_SLIDING, hd, 1, plane, w.plane(1, plane),
                        f"{what}: the full-attention layer")

        n = handle.num_tokens()
        expect_all(handle, written["w"], f"after {n} tokens")
        stats = handle.stats()
        released = stats.blocks_released
        check(released >= -(-n // BS) - bound, GROUPS_SLIDING,
              "handle.stats().blocks_released of the sliding group", seen=released,
              expected=f">= {-(-n // BS) - bound}")
        check(mgr.stats().window_released_blocks >= released, GROUPS_SLIDING,
              "manager stats window_released_blocks", seen=mgr.stats().window_released_blocks,
              expected=f">= {released}")
        _fork_and_write(h, mgr, handle, written, shapes, expect_all)  # the shared last blocks are copied
        _swap_round_trip(mgr, handle, swap, written["w"], expect_all)
        _check_invariants(mgr, GROUPS_SLIDING, "after the window moved")

    @covers(GROUPS_LATENT)
    def test_latent_layers_keep_one_vector_per_token(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        latent = 12
        swap = _swap_device(h)
        mgr = h.manager(num_layers=2, block_size=BS, num_blocks=32,
                        swap_blocks=16 if swap is not None else 0,
                        **({"swap_device": swap} if swap is not None else {}),
                        layer_groups=(LayerGroup(kind="latent", layers=(0,), latent_dim=latent),
                                      LayerGroup(layers=(1,))))
        shapes = {0: ((1, latent),), 1: ((h.heads, h.dim),) * 2}
        prompt = tuple(range(100, 100 + 2 * BS + 1))
        handle = h.allocate(mgr, "mla", prompt=prompt)
        written = {"mla": _Written(2, 2)}
        _prefill(h, mgr, handle, shapes, written["mla"])
        for _ in range(BS + 1):
            _step(h, mgr, [handle], written, shapes)

        def expect_all(hd: PagedKvCacheHandle, w: _Written, what: str) -> None:
            _expect(h, GROUPS_LATENT, hd, 0, 0, w.plane(0, 0), f"{what}: the latent layer")
            _expect(h, GROUPS_LATENT, hd, 0, 1, None, f"{what}: the latent layer")
            for plane in (0, 1):
                _expect(h, GROUPS_LATENT, hd, 1, plane, w.plane(1, plane),
                        f"{what}: the full-attention layer")

        expect_all(handle, written["mla"], "after prefill and decode steps")
        (pool,) = mgr.layer_pools(0)
        check_equal(tuple(pool.shape), (1, 32, BS, 1, latent), GROUPS_LATENT,
                    "layer_pools(0) of the latent layer: one plane of one head")
        expect_raises(GROUPS_LATENT, TypeError,
                      lambda: mgr.write(handle, 0, h.native(_rows(h, 1, 1, latent)),
                                        h.native(_rows(h, 1, 1, latent)), start=0),
                      "a latent write given a value")
        _fork_and_write(h, mgr, handle, written, shapes, expect_all)
        shared = h.allocate(mgr, "mla-hit", prompt=prompt)
        check(shared.num_cached_tokens() >= 2 * BS, GROUPS_LATENT, "prompt tokens a repeated "
              "prompt finds in the prefix cache", seen=shared.num_cached_tokens(),
              expected=f">= {2 * BS}")
        hit = shared.num_cached_tokens()
        _expect(h, GROUPS_LATENT, shared, 0, 0, written["mla"].plane(0, 0)[:hit],
                "a prefix hit on the latent layer")
        _swap_round_trip(mgr, handle, swap, written["mla"], expect_all)
        _check_invariants(mgr, GROUPS_LATENT, "after the latent layer's operations")

    @covers(GROUPS_KV_WIDTHS)
    def test_k_and_v_of_different_widths_keep_a_pool_each(self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        k_dim, v_dim = h.dim, max(1, h.dim // 2)
        swap = _swap_device(h)
        mgr = h.manager(num_layers=2, block_size=BS, num_blocks=32,
                        swap_blocks=16 if swap is not None else 0,
                        **({"swap_device": swap} if swap is not None else {}),
                        layer_groups=(LayerGroup(layers=(0, 1), v_head_dim=v_dim),))
        shapes = {layer: ((h.heads, k_dim), (h.heads, v_dim)) for layer in (0, 1)}
        prompt = tuple(range(7, 7 + 2 * BS + 2))
        handle = h.allocate(mgr, "kv", prompt=prompt)
        written = {"kv": _Written(2, 2)}
        _prefill(h, mgr, handle, shapes, written["kv"])
        for _ in range(BS):
            _step(h, mgr, [handle], written, shapes)

        def expect_all(hd: PagedKvCacheHandle, w: _Written, what: str) -> None:
            for layer in (0, 1):
                for plane in (0, 1):
                    _expect(h, GROUPS_KV_WIDTHS, hd, layer, plane, w.plane(layer, plane), what)

        expect_all(handle, written["kv"], "after prefill and decode steps")
        pools = mgr.layer_pools(0)
        check_equal([tuple(p.shape) for p in pools],
                    [(1, 32, BS, h.heads, k_dim), (1, 32, BS, h.heads, v_dim)],
                    GROUPS_KV_WIDTHS, "layer_pools(0): K's pool and V's pool")
        expect_raises(GROUPS_KV_WIDTHS, UnsupportedError, lambda: mgr.layer_pool(0),
                      "layer_pool of a layer keeping two pools")
        _fork_and_write(h, mgr, handle, written, shapes, expect_all)  # copy-on-write of the shared last block
        shared = h.allocate(mgr, "kv-hit", prompt=prompt)
        hit = shared.num_cached_tokens()
        check(hit >= 2 * BS, GROUPS_KV_WIDTHS, "prompt tokens a repeated prompt finds in the "
              "prefix cache", seen=hit, expected=f">= {2 * BS}")
        for plane in (0, 1):
            _expect(h, GROUPS_KV_WIDTHS, shared, 1, plane,
                    written["kv"].plane(1, plane)[:hit], "a prefix hit")
        _swap_round_trip(mgr, handle, swap, written["kv"], expect_all)
        _check_invariants(mgr, GROUPS_KV_WIDTHS, "after the two-pool layer's operations")

    @covers(GROUPS_CROSS)
    def test_cross_attention_holds_the_encoder_tokens_written_once(
            self, kvcore_harness: Harness) -> None:
        h = kvcore_harness
        encoder = 2 * BS + 2
        mgr = h.manager(num_layers=2, block_size=BS, num_blocks=32,
                        layer_groups=(LayerGroup(layers=(0,)),
                                      LayerGroup(kind="cross", layers=(1,),
                                                 encoder_tokens=encoder)))
        shapes = {layer: ((h.heads, h.dim),) * 2 for layer in (0, 1)}
        handle = h.allocate(mgr, "dec", 1)
        written = {"dec": _Written(2, 2)}
        enc_k, enc_v = _rows(h, encoder, h.heads, h.dim), _rows(h, encoder, h.heads, h.dim)
        mgr.write(handle, 1, h.native(enc_k[:3]), h.native(enc_v[:3]), start=0)
        mgr.write(handle, 1, h.native(enc_k[3:]), h.native(enc_v[3:]), start=3)
        written["dec"].add(1, enc_k, enc_v)
        _prefill(h, mgr, handle, {0: shapes[0]}, written["dec"])
        for _ in range(BS + 2):
            _step(h, mgr, [handle], written, shapes, skip=(1,))

        def expect_all(hd: PagedKvCacheHandle, w: _Written, what: str) -> None:
            for layer in (0, 1):
                for plane in (0, 1):
                    _expect(h, GROUPS_CROSS, hd, layer, plane, w.plane(layer, plane), what)
            pair = hd.kv_cache(1)
            if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] is not None):
                fail(GROUPS_CROSS, f"{what}: kv_cache(1) of the cross-attention layer must be "
                     "the (key, value) pair of the encoder tokens", seen=pair)
            assert_same_bits(GROUPS_CROSS, h.host(pair[1]), w.plane(1, 1), h.dtype,
                             f"{what}: kv_cache(1)[1] (the encoder's V)")

        expect_all(handle, written["dec"], f"after {handle.num_tokens()} decoder tokens")
        check_equal(handle.num_written(1), encoder, GROUPS_CROSS,
                    "num_written of the cross-attention layer (the encoder tokens)")
        mapping = mgr.extend_batch([handle], 1)
        expect_raises(GROUPS_CROSS, UnsupportedError,
                      lambda: mgr.write_slots(1, mapping, h.native(h.kv(1)), h.native(h.kv(1))),
                      "write_slots of a decode step into the cross-attention layer")
        k0, v0 = _rows(h, 1, h.heads, h.dim), _rows(h, 1, h.heads, h.dim)
        mgr.write_slots(0, mapping, h.native(k0), h.native(v0))
        written["dec"].add(0, k0, v0)
        expect_raises(GROUPS_CROSS, CapacityError,
                      lambda: mgr.write(handle, 1, h.native(h.kv(1)), h.native(h.kv(1)),
                                        start=encoder),
                      "a cross-attention write past the encoder tokens reserved")
        _fork_and_write(h, mgr, handle, written, shapes, expect_all, skip=(1,),
                        child_what="the fork")
        _check_invariants(mgr, GROUPS_CROSS, "after the cross-attention layer's operations")
