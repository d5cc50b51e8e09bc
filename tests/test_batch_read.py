"""KvCacheManager.read_batch: one layer's K and V for a whole batch, padded, in one
gather per plane; bit for bit what per-sequence reads give, zeros past each length."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import AllocationRequest, BatchKv, CacheConfig, KvCacheManager
from kvcore._backend import Backend
from kvcore._registry import get_backend
from kvcore.errors import (HandleSwappedError, InvalidHandleError, LayerIndexError,
                           ManagerClosedError, PendingPrefixError)
from kvcore.models import LayerGroup

BACKENDS = ["numpy", "torch", "jax"]
H, D, BS = 2, 4, 4


def host(ref) -> np.ndarray:
    return np.asarray(ref.native) if not hasattr(ref.native, "numpy") \
        else ref.native.detach().cpu().numpy()


def odd_bits(rng: np.random.Generator, n: int, heads: int = H, dim: int = D) -> np.ndarray:
    """Random float32 with -0.0, subnormals, infinities and NaN payloads mixed in."""
    x = rng.standard_normal((n, heads, dim)).astype(np.float32)
    bits = x.view(np.uint32).reshape(-1)
    specials = np.array([0x80000000, 0x00000001, 0x007FFFFF, 0x7F800000, 0xFF800000,
                         0x7FC00001, 0xFFA5A5A5], dtype=np.uint32)
    where = rng.choice(bits.size, size=min(bits.size, 2 * specials.size), replace=False)
    bits[where] = np.resize(specials, where.size)
    return x


def cfg(**kw) -> CacheConfig:
    base = dict(num_layers=2, num_kv_heads=H, head_dim=D, dtype="float32", block_size=BS,
                num_blocks=64, swap_blocks=16)
    base.update(kw)
    return CacheConfig(**base)


def filled(backend: str, lengths: list[int], config: CacheConfig | None = None, seed: int = 0):
    """A manager with one sequence per length, every layer written with odd bits;
    returns it, the handles and what each holds (K, V per layer)."""
    mgr = KvCacheManager(config or cfg(), backend)
    rng = np.random.default_rng(seed)
    handles, data = [], []
    for i, n in enumerate(lengths):
        h = mgr.allocate(AllocationRequest(request_id=f"r{i}", num_tokens=n))
        per_layer = []
        for layer in range(mgr.config.num_layers):
            k, v = odd_bits(rng, n), odd_bits(rng, n)
            if n:
                mgr.write(h, layer, k, v)
            per_layer.append((k, v))
        handles.append(h)
        data.append(per_layer)
    return mgr, handles, data


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[5, 9, 0, 16], [1], [BS] * 3, [0, 0], [2 * BS + 1, 3]])
def test_a_batch_read_is_bit_for_bit_the_sequences_reads_zero_padded(backend, lengths):
    mgr, handles, data = filled(backend, lengths)
    for layer in range(2):
        batch = mgr.read_batch(handles, layer)
        assert isinstance(batch, BatchKv) and batch.layout == "NHD"
        tokens = max(lengths)
        assert batch.key.shape == (len(lengths), tokens, H, D) == batch.value.shape
        assert batch.lengths.tolist() == lengths and batch.starts.tolist() == [0] * len(lengths)
        k, v = host(batch.key), host(batch.value)
        assert k.shape == batch.key.shape
        for b, n in enumerate(lengths):
            want_k, want_v = data[b][layer]
            assert np.array_equal(k[b, :n].view(np.uint32), want_k.view(np.uint32))
            assert np.array_equal(v[b, :n].view(np.uint32), want_v.view(np.uint32))
            assert not k[b, n:].view(np.uint32).any() and not v[b, n:].view(np.uint32).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_heads_first_layout_is_the_transpose(backend):
    mgr, handles, _ = filled(backend, [3, 7])
    nhd, hnd = mgr.read_batch(handles, 1), mgr.read_batch(handles, 1, layout="HND")
    assert hnd.layout == "HND" and hnd.key.shape == (2, H, 7, D)
    for a, b in ((nhd.key, hnd.key), (nhd.value, hnd.value)):
        assert np.array_equal(host(a).transpose(0, 2, 1, 3).view(np.uint32),
                              host(b).view(np.uint32))


def test_padding_never_shows_what_a_reused_block_held_before():
    """A freed sequence leaves NaNs in its blocks; shorter sequences reusing them read
    zeros past their lengths, never the NaNs (which would poison masked attention)."""
    mgr = KvCacheManager(cfg(num_blocks=4), "numpy")
    h = mgr.allocate(AllocationRequest(request_id="old", num_tokens=4 * BS))
    nan = np.full((4 * BS, H, D), np.nan, np.float32)
    mgr.write(h, 0, nan, nan)
    mgr.deallocate(h)
    a = mgr.allocate(AllocationRequest(request_id="a", num_tokens=1))
    b = mgr.allocate(AllocationRequest(request_id="b", num_tokens=2 * BS + 1))
    for x, n in ((a, 1), (b, 2 * BS + 1)):
        mgr.write(x, 0, np.ones((n, H, D), np.float32), np.ones((n, H, D), np.float32))
    batch = mgr.read_batch([a, b], 0)
    k = host(batch.key)
    assert np.isfinite(k).all()
    assert (k[0, 1:] == 0).all() and (k[1, 2 * BS + 1:] == 0).all()


def test_one_gather_per_plane_however_many_sequences(monkeypatch):
    mgr, handles, _ = filled("numpy", [BS * i + 1 for i in range(8)])
    calls = []
    backend = mgr.backend
    original = type(backend).gather_blocks
    monkeypatch.setattr(type(backend), "gather_blocks",
                        lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(type(backend), "gather",
                        lambda self, *a: pytest.fail("a batch read gathered slot by slot"))
    mgr.read_batch(handles, 0)
    assert len(calls) == 2


class _SlotsOnly(type(get_backend("numpy"))):
    """The numpy backend without gather_blocks: a third-party backend's fallback."""

    name = "numpy-slots-only"
    gather_blocks = Backend.gather_blocks


def test_a_backend_without_block_gathers_reads_through_its_slot_gather():
    config = cfg()
    mgr, handles, data = filled("numpy", [6, 1, 11], config)
    other = KvCacheManager(config, _SlotsOnly())
    moved = []
    for b, h in enumerate(handles):
        n = len(data[b][0][0])
        x = other.allocate(AllocationRequest(request_id=f"r{b}", num_tokens=n))
        for layer in range(2):
            other.write(x, layer, *data[b][layer])
        moved.append(x)
    want, got = mgr.read_batch(handles, 0), other.read_batch(moved, 0)
    assert np.array_equal(host(want.key).view(np.uint32), host(got.key).view(np.uint32))
    assert np.array_equal(host(want.value).view(np.uint32), host(got.value).view(np.uint32))


def test_a_sliding_window_row_starts_where_its_window_does():
    config = cfg(num_layers=2, layer_groups=(
        LayerGroup(kind="sliding", layers=(0,), window=BS),
        LayerGroup(kind="full", layers=(1,))))
    mgr = KvCacheManager(config, "numpy")
    rng = np.random.default_rng(3)
    h = mgr.allocate(AllocationRequest(request_id="long", num_tokens=0))
    short = mgr.allocate(AllocationRequest(request_id="short", num_tokens=2))
    for x, n in ((short, 2),):
        for layer in range(2):
            mgr.write(x, layer, odd_bits(rng, n), odd_bits(rng, n))
    for _ in range(5 * BS + 2):  # decode one token at a time: the window slides
        mgr.extend(h, 1)
        for layer in range(2):
            mgr.write(h, layer, odd_bits(rng, 1), odd_bits(rng, 1))
    batch = mgr.read_batch([h, short], 0)
    first = h.first_position(0)
    assert first > 0 and batch.starts.tolist() == [first, 0]
    assert batch.lengths.tolist() == [5 * BS + 2 - first, 2]
    assert np.array_equal(host(batch.key)[0, :batch.lengths[0]].view(np.uint32),
                          host(h.key_cache(0)).view(np.uint32))
    full = mgr.read_batch([h, short], 1)
    assert full.starts.tolist() == [0, 0] and full.lengths.tolist() == [5 * BS + 2, 2]


def test_a_latent_layer_reads_one_plane_and_split_widths_read_both():
    config = cfg(num_layers=2, layer_groups=(
        LayerGroup(kind="latent", layers=(0,), latent_dim=6),
        LayerGroup(kind="full", layers=(1,), head_dim=4, v_head_dim=2)))
    mgr = KvCacheManager(config, "numpy")
    rng = np.random.default_rng(5)
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=5))
    latent = rng.standard_normal((5, 1, 6)).astype(np.float32)
    mgr.write(h, 0, latent, None)
    k, v = odd_bits(rng, 5, H, 4), odd_bits(rng, 5, H, 2)
    mgr.write(h, 1, k, v)
    batch = mgr.read_batch([h], 0)
    assert batch.value is None and np.array_equal(host(batch.key)[0], latent)
    split = mgr.read_batch([h], 1)
    assert split.key.shape == (1, 5, H, 4) and split.value.shape == (1, 5, H, 2)
    assert np.array_equal(host(split.value)[0].view(np.uint32), v.view(np.uint32))


def test_a_joiner_cannot_batch_read_a_layer_its_writer_has_not_written():
    mgr = KvCacheManager(cfg(), "numpy")
    prompt = list(range(3 * BS))
    writer = mgr.allocate(AllocationRequest(request_id="w", prompt_token_ids=prompt))
    joiner = mgr.allocate(AllocationRequest(request_id="j", prompt_token_ids=prompt,
                                            join_pending=True))
    with pytest.raises(PendingPrefixError, match="layer 0"):
        mgr.read_batch([writer, joiner], 0)
    k = np.ones((3 * BS, H, D), np.float32)
    mgr.write(writer, 0, k, k)
    start = joiner.num_cached_tokens()
    mgr.write(joiner, 0, k[start:], k[start:], start=start)
    assert host(mgr.read_batch([writer, joiner], 0).key).shape == (2, 3 * BS, H, D)


def test_bad_batch_reads_are_typed_and_change_nothing():
    mgr, handles, _ = filled("numpy", [3, 5])
    before = host(mgr.layer_pool(0)).copy()
    with pytest.raises(ValueError, match="layout must be one of .*got 'BHTD'"):
        mgr.read_batch(handles, 0, layout="BHTD")
    with pytest.raises(LayerIndexError, match="layer 2 is out of range"):
        mgr.read_batch(handles, 2)
    with pytest.raises(TypeError, match="layer must be an int"):
        mgr.read_batch(handles, "0")
    with pytest.raises(TypeError, match="expected a list of handles"):
        mgr.read_batch("r0", 0)
    with pytest.raises(ValueError, match="'r0' appears more than once"):
        mgr.read_batch([handles[0], "r0"], 0)
    assert np.array_equal(host(mgr.layer_pool(0)).view(np.uint32), before.view(np.uint32))
    mgr.swap_out(handles[1])
    with pytest.raises(HandleSwappedError):
        mgr.read_batch(handles, 0)
    mgr.swap_in(handles[1])
    mgr.deallocate(handles[0])
    with pytest.raises(InvalidHandleError):
        mgr.read_batch(handles, 0)
    empty = mgr.read_batch([], 0)
    assert empty.key.shape == (0, 0, H, D) and empty.lengths.size == 0
    mgr.close()
    with pytest.raises(ManagerClosedError):
        mgr.read_batch([handles[1]], 0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("codec", ["int8", "float8_e4m3"])
def test_a_codec_cache_batch_reads_what_each_sequence_reads(backend, codec):
    """Codes and scales are gathered whole-block and decoded: the batch read equals
    the per-sequence reads (already decoded) bit for bit, zero-padded."""
    config = cfg(dtype=codec, compute_dtype="float32")
    mgr = KvCacheManager(config, backend)
    rng = np.random.default_rng(9)
    handles = []
    for i, n in enumerate([3, 2 * BS + 1]):
        h = mgr.allocate(AllocationRequest(request_id=f"r{i}", num_tokens=n))
        k = rng.standard_normal((n, H, D)).astype(np.float32)
        mgr.write(h, 0, k, -k)
        handles.append(h)
    batch = mgr.read_batch(handles, 0)
    k = host(batch.key)
    for b, h in enumerate(handles):
        n = h.num_tokens()
        assert np.array_equal(k[b, :n].view(np.uint32), host(h.key_cache(0)).view(np.uint32))
        assert not k[b, n:].any()
