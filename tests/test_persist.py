"""KvCacheManager.save / load: safetensors files that round-trip K/V bit for bit, refuse
other layouts and broken files with typed errors, and load all or nothing."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import kvcore
from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore._backend import BITS_DTYPES
from kvcore._cache_file import write_file
from kvcore._persist import collect, host_bits
from kvcore.errors import (CacheError, CacheFileError, DuplicateRequestError, KvCoreError,
                           LayoutMismatchError, OutOfBlocksError)

BS = 4
CASES = [("numpy", "float16"), ("numpy", "float32"), ("torch", "float16"),
         ("torch", "float32"), ("torch", "bfloat16")]


def _manager(backend="numpy", dtype="float16", *, layers=2, heads=2, dim=4, blocks=64,
             block_size=BS, **fields) -> KvCacheManager:
    cfg = CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=dtype,
                      block_size=block_size, num_blocks=blocks, **fields)
    return KvCacheManager(cfg, backend=backend)


def _odd_bits(rng, n, mgr) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, signed zeros, subnormals, infinities), with
    the odd ones spelled out at the front so every run has them."""
    cfg = mgr.config
    want = BITS_DTYPES[cfg.dtype]
    width = 32 if want == np.uint32 else 16
    bits = rng.integers(0, 2**width, size=(n, cfg.num_kv_heads, cfg.head_dim),
                        dtype=np.uint64).astype(want)
    if width == 16:
        odd = [0x8000, 0x0001, 0x7FC1, 0xFF81, 0x7D01, 0x03FF, 0x7C00, 0xFE01]
    else:
        odd = [0x80000000, 0x00000001, 0x7FC00001, 0xFF800001, 0x7FA00000, 0x007FFFFF]
    flat = bits.reshape(-1)
    flat[:min(len(odd), flat.size)] = odd[:flat.size]
    return bits


def _fill(mgr, handle, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """Write odd bits into every layer of ``handle``; returns what was written."""
    cfg, n = mgr.config, handle.num_tokens()
    out = []
    for layer in range(cfg.num_layers):
        k, v = _odd_bits(rng, n, mgr), _odd_bits(rng, n, mgr)
        if n:
            mgr.write(handle, layer, mgr.backend.from_bits(k, cfg.dtype, cfg.device),
                      mgr.backend.from_bits(v, cfg.dtype, cfg.device), start=0)
        out.append((k, v))
    return out


def _write_bits(mgr, handle, data) -> None:
    cfg = mgr.config
    for layer, (k, v) in enumerate(data):
        mgr.write(handle, layer, mgr.backend.from_bits(k, cfg.dtype, cfg.device),
                  mgr.backend.from_bits(v, cfg.dtype, cfg.device), start=0)


def _read(mgr, handle) -> list[tuple[np.ndarray, np.ndarray]]:
    cfg = mgr.config
    out = []
    for layer in range(cfg.num_layers):
        pair = handle.kv_cache(layer)
        if pair is None:
            empty = np.zeros((0, cfg.num_kv_heads, cfg.head_dim), BITS_DTYPES[cfg.dtype])
            out.append((empty, empty))
        else:
            out.append(tuple(host_bits(mgr.backend, x.native, cfg.dtype) for x in pair))
    return out


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _state(mgr) -> tuple:
    """Everything a refused load must leave as it was."""
    return (mgr.stats().model_dump(), sorted(h.request_id for h in mgr.list_handles()))


def _four_sequences(mgr, rng):
    """A prompt with ids ending mid-block, one of whole blocks, one without ids, and
    an empty one: (handles, what each holds)."""
    handles = [
        mgr.allocate(AllocationRequest(request_id="mid", prompt_token_ids=list(range(2, 13)))),
        mgr.allocate(AllocationRequest(request_id="whole", prompt_token_ids=[7] * (2 * BS))),
        mgr.allocate(AllocationRequest(request_id="no-ids", num_tokens=6)),
        mgr.allocate(AllocationRequest(request_id="empty", num_tokens=0)),
    ]
    return handles, [_fill(mgr, h, rng) for h in handles]


@pytest.mark.parametrize("backend,dtype", CASES)
def test_round_trip_is_bit_identical_with_token_ids(tmp_path, backend, dtype):
    rng = np.random.default_rng(1)
    src = _manager(backend, dtype)
    handles, data = _four_sequences(src, rng)
    # Extending with ids keeps them; the saved ids cover prompt and decode tokens.
    src.extend(handles[0], 1, token_ids=[99])
    for layer in range(2):
        k, v = _odd_bits(rng, 1, src), _odd_bits(rng, 1, src)
        cfg = src.config
        src.write(handles[0], layer, src.backend.from_bits(k, cfg.dtype, cfg.device),
                  src.backend.from_bits(v, cfg.dtype, cfg.device))
    data[0] = _read(src, handles[0])
    path = tmp_path / "cache.safetensors"
    src.save(path, handles)

    dst = _manager(backend, dtype)
    loaded = dst.load(path)
    assert [h.request_id for h in loaded] == ["mid", "whole", "no-ids", "empty"]
    assert [h.num_tokens() for h in loaded] == [12, 8, 6, 0]
    assert loaded[0].token_ids() == tuple(range(2, 13)) + (99,)
    assert loaded[1].token_ids() == (7,) * 8 and loaded[2].token_ids() is None
    for h, want in zip(loaded, data):
        assert _same(_read(dst, h), want)
    dst.check_invariants()


def test_block_size_may_differ_and_data_stays_exact(tmp_path):
    rng = np.random.default_rng(2)
    src = _manager()
    handles, data = _four_sequences(src, rng)
    src.save(tmp_path / "c", handles)
    for block_size in (1, 3, 16):
        dst = _manager(block_size=block_size)
        for h, want in zip(dst.load(tmp_path / "c"), data):
            assert _same(_read(dst, h), want)
        dst.check_invariants()


def test_loading_registers_full_prompt_blocks_in_the_prefix_cache(tmp_path):
    rng = np.random.default_rng(3)
    src = _manager()
    prompt = list(range(10, 21))  # 11 tokens: two full blocks and a partial one
    h = src.allocate(AllocationRequest(request_id="p", prompt_token_ids=prompt))
    want = _fill(src, h, rng)
    src.save(tmp_path / "c", [h])

    dst = _manager()
    [loaded] = dst.load(tmp_path / "c")
    assert loaded.num_cached_tokens() == 0  # nothing was cached yet: all written
    later = dst.allocate(AllocationRequest(request_id="later", prompt_token_ids=prompt + [5]))
    assert later.num_cached_tokens() == 2 * BS  # served from what the load registered
    assert dst.stats().prefix_cache_hits == 2
    assert _same([(k[:8], v[:8]) for k, v in _read(dst, later)],
                 [(k[:8], v[:8]) for k, v in want])


def test_loading_again_shares_the_blocks_already_cached(tmp_path):
    rng = np.random.default_rng(4)
    mgr = _manager()
    h = mgr.allocate(AllocationRequest(request_id="p", prompt_token_ids=list(range(11))))
    want = _fill(mgr, h, rng)
    mgr.save(tmp_path / "c", [h])
    used = mgr.stats().used_blocks
    with pytest.raises(DuplicateRequestError, match="'p'"):
        mgr.load(tmp_path / "c")
    [copy] = mgr.load(tmp_path / "c", request_ids=["copy"])
    # allow_full_hit: both full blocks are shared, only the partial one is new.
    assert copy.num_cached_tokens() == 2 * BS
    assert mgr.stats().used_blocks == used + 1
    assert _same(_read(mgr, copy), want)
    mgr.check_invariants()


def test_a_file_of_forks_loads_them_sharing_their_full_blocks(tmp_path):
    rng = np.random.default_rng(5)
    src = _manager()
    parent = src.allocate(AllocationRequest(request_id="p", prompt_token_ids=list(range(9))))
    want = _fill(src, parent, rng)
    forks = [parent] + [src.fork(parent, f"f{i}") for i in range(3)]
    src.save(tmp_path / "c", forks)
    dst = _manager()
    loaded = dst.load(tmp_path / "c")
    # 9 tokens: two full blocks shared by all four, one partial block each.
    assert dst.stats().used_blocks == 2 + 4
    for h in loaded:
        assert _same(_read(dst, h), want)


def test_the_file_is_plain_safetensors_with_a_layout_fingerprint(tmp_path):
    rng = np.random.default_rng(6)
    mgr = _manager("torch", "bfloat16", blocks=16)
    h = mgr.allocate(AllocationRequest(request_id="a", prompt_token_ids=[1, 2, 3, 4, 5]))
    _fill(mgr, h, rng)
    mgr.save(tmp_path / "c.safetensors", [h], metadata={"model": "tiny-llama"})
    import torch
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "c.safetensors")
    assert tensors["seq.0.key"].dtype == torch.bfloat16
    assert tuple(tensors["seq.0.key"].shape) == (2, 5, 2, 4)
    assert torch.equal(tensors["seq.0.key"][1].view(torch.int16),
                       h.key_cache(1).native.view(torch.int16))
    assert tensors["seq.0.token_ids"].tolist() == [1, 2, 3, 4, 5]
    with safetensors.safe_open(tmp_path / "c.safetensors", framework="numpy") as f:
        meta = f.metadata()
    assert json.loads(meta["kvcore.layout"]) == {
        "num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "bfloat16",
        "block_size": BS}
    assert meta["kvcore.format_version"] == "1" and meta["model"] == "tiny-llama"
    info = kvcore.inspect_cache_file(tmp_path / "c.safetensors")
    assert info.layout == kvcore.CacheLayout.of(mgr.config)
    assert info.sequences == (kvcore.SavedSequence(request_id="a", num_tokens=5,
                                                   token_ids=True),)
    assert info.metadata == {"model": "tiny-llama"}
    assert b"pickle" not in (tmp_path / "c.safetensors").read_bytes()[:64]


@pytest.mark.parametrize("change", [dict(layers=3), dict(heads=4), dict(dim=8),
                                    dict(dtype="float32")],
                         ids=["layers", "kv_heads", "head_dim", "dtype"])
def test_another_layout_is_refused_naming_both_and_changes_nothing(tmp_path, change):
    rng = np.random.default_rng(7)
    src = _manager()
    h = src.allocate(AllocationRequest(request_id="a", prompt_token_ids=list(range(6))))
    _fill(src, h, rng)
    src.save(tmp_path / "c", [h])
    dst = _manager(**change)
    before = _state(dst)
    with pytest.raises(LayoutMismatchError) as err:
        dst.load(tmp_path / "c")
    text = str(err.value)
    assert "num_layers=2, num_kv_heads=2, head_dim=4, dtype=float16" in text
    assert str(kvcore.CacheLayout.of(dst.config)) in text
    assert isinstance(err.value, CacheError)
    assert _state(dst) == before


def _saved(tmp_path, mgr=None) -> tuple[KvCacheManager, bytes]:
    mgr = mgr or _manager()
    h = mgr.allocate(AllocationRequest(request_id="a", prompt_token_ids=list(range(7))))
    _fill(mgr, h, np.random.default_rng(8))
    mgr.save(tmp_path / "good", [h])
    return mgr, (tmp_path / "good").read_bytes()


def _rewrite_header(raw: bytes, edit) -> bytes:
    """The file with its JSON header changed by ``edit(header)``, data kept."""
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + size:]


def _meta(key, value):
    def edit(header):
        header["__metadata__"][key] = value
    return edit


BROKEN = {
    "empty": lambda raw: b"",
    "truncated-data": lambda raw: raw[:-5],
    "truncated-header": lambda raw: raw[:20],
    "garbage": lambda raw: os.urandom(256),
    "header-length-lies": lambda raw: struct.pack("<Q", 2**40) + raw[8:],
    "format-version-2": lambda raw: _rewrite_header(raw, _meta("kvcore.format_version", "2")),
    "not-kvcore": lambda raw: _rewrite_header(raw, _meta("kvcore.format", "something")),
    "layout-not-json": lambda raw: _rewrite_header(raw, _meta("kvcore.layout", "{oops")),
    "layout-negative": lambda raw: _rewrite_header(raw, _meta(
        "kvcore.layout", json.dumps({"num_layers": -2, "num_kv_heads": 2, "head_dim": 4,
                                     "dtype": "float16", "block_size": 4}))),
    "sequence-longer-than-its-tensors": lambda raw: _rewrite_header(raw, _meta(
        "kvcore.sequences", json.dumps([{"request_id": "a", "num_tokens": 8,
                                         "token_ids": True}]))),
    "tensor-missing": lambda raw: _rewrite_header(raw, _meta(
        "kvcore.sequences", json.dumps([{"request_id": "a", "num_tokens": 7,
                                         "token_ids": True}] * 2))),
    "tensor-dtype": lambda raw: _rewrite_header(
        raw, lambda h: h["seq.0.token_ids"].update(dtype="U64")),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_a_broken_or_foreign_file_is_a_typed_error_and_changes_nothing(tmp_path, breakage):
    _, raw = _saved(tmp_path)
    path = tmp_path / "bad"
    path.write_bytes(BROKEN[breakage](raw))
    dst = _manager()
    before = _state(dst)
    with pytest.raises(CacheFileError):
        dst.load(path)
    assert _state(dst) == before
    dst.check_invariants()


def test_a_safetensors_file_from_elsewhere_is_refused_by_name(tmp_path):
    safetensors.numpy.save_file({"weight": np.zeros((2, 2), np.float32)}, tmp_path / "w")
    with pytest.raises(CacheFileError, match="not a kvcore cache"):
        _manager().load(tmp_path / "w")
    with pytest.raises(CacheFileError, match="not a kvcore cache"):
        kvcore.inspect_cache_file(tmp_path / "w")
    with pytest.raises(FileNotFoundError):
        _manager().load(tmp_path / "missing")


def test_token_ids_out_of_range_in_a_file_are_refused(tmp_path):
    mgr, _ = _saved(tmp_path)
    payload = collect(mgr, mgr.list_handles(), None)
    name, code, ids = payload.tensors[2]
    payload.tensors[2] = (name, code, np.where(np.arange(ids.size) == 3, -5, ids))
    write_file(tmp_path / "neg", payload)
    with pytest.raises(CacheFileError, match=r"seq\.0\.token_ids\[3\] is -5"):
        _manager().load(tmp_path / "neg")


def test_a_load_that_does_not_fit_changes_nothing(tmp_path):
    rng = np.random.default_rng(9)
    src = _manager()
    handles, _ = _four_sequences(src, rng)  # 3 + 2 + 2 + 0 blocks
    src.save(tmp_path / "c", handles)
    dst = _manager(blocks=8)
    # A cached prompt sits in the free blocks: a refused load must not evict it.
    keep = dst.allocate(AllocationRequest(request_id="keep", prompt_token_ids=[3] * 8))
    _fill(dst, keep, rng)
    dst.deallocate(keep)
    blocker = dst.allocate(AllocationRequest(request_id="blocker", num_tokens=2 * BS))
    before = _state(dst)
    with pytest.raises(OutOfBlocksError, match="needs 7 new blocks.*only 6 are free"
                       ".*nothing was loaded") as err:
        dst.load(tmp_path / "c")
    assert isinstance(err.value, KvCoreError)
    assert _state(dst) == before  # counters, cached blocks, live sequences
    dst.deallocate(blocker)
    dst.allocate(AllocationRequest(request_id="smaller", num_tokens=BS))
    assert len(dst.load(tmp_path / "c")) == 4  # with one more block it fits exactly
    assert dst.stats().free_blocks + dst.stats().cached_blocks == 0
    dst.check_invariants()


def test_a_load_counts_blocks_it_takes_back_from_the_prefix_cache(tmp_path):
    rng = np.random.default_rng(10)
    src = _manager()
    a = src.allocate(AllocationRequest(request_id="a", prompt_token_ids=[4] * 8))
    b = src.allocate(AllocationRequest(request_id="b", prompt_token_ids=[5] * 16))
    want = [_fill(src, h, rng) for h in (a, b)]
    src.save(tmp_path / "c", [b, a])  # b first: its new blocks come before a's hits
    # The pool: 2 empty blocks, then a's two blocks cached (older), then two others.
    dst = _manager(blocks=6)
    cached_a = dst.allocate(AllocationRequest(request_id="a", prompt_token_ids=[4] * 8))
    _write_bits(dst, cached_a, want[0])  # the same K/V as the file's a
    dst.deallocate(cached_a)
    other = dst.allocate(AllocationRequest(request_id="other", prompt_token_ids=[6] * 8))
    _fill(dst, other, rng)
    dst.deallocate(other)
    assert dst.stats().cached_blocks == 4
    # b needs 4 new blocks: both empty ones, then it evicts a's cached blocks (the
    # least recently freed).  The count says 4 + 0 <= 6 - 2 and is right: a then
    # takes the evicted blocks' places from what is left.
    loaded = dst.load(tmp_path / "c")
    for h, w in zip(loaded, [want[1], want[0]]):
        assert _same(_read(dst, h), w)
    assert dst.stats().evictions == 4
    dst.check_invariants()


def test_a_backend_failing_mid_load_leaves_no_sequence_behind(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    src = _manager()
    handles, _ = _four_sequences(src, rng)
    src.save(tmp_path / "c", handles)
    dst = _manager()
    calls = []

    def failing(bits, dtype, device):
        calls.append(1)
        if len(calls) == 3:  # the second sequence's keys
            raise MemoryError("device is full")
        return type(dst.backend).from_bits(dst.backend, bits, dtype, device)

    monkeypatch.setattr(dst.backend, "from_bits", failing)
    with pytest.raises(MemoryError):
        dst.load(tmp_path / "c")
    assert len(dst) == 0 and dst.stats().used_blocks == 0
    dst.check_invariants()


def test_save_refuses_what_it_cannot_write_whole(tmp_path):
    mgr = _manager()
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=5))
    _fill(mgr, h, np.random.default_rng(12))
    mgr.extend(h, 1)  # reserved, not written
    with pytest.raises(CacheError, match="'a' holds 6 tokens but layer 0 has K/V for 5"):
        mgr.save(tmp_path / "c", [h])
    assert not (tmp_path / "c").exists() and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="kvcore's own"):
        mgr.save(tmp_path / "c", [], metadata={"kvcore.layout": "mine"})
    with pytest.raises(TypeError, match="str to str"):
        mgr.save(tmp_path / "c", [], metadata={"n": 3})
    other = _manager()
    stranger = other.allocate(AllocationRequest(request_id="s", num_tokens=1))
    with pytest.raises(kvcore.errors.InvalidHandleError):
        mgr.save(tmp_path / "c", [stranger])
    mgr.deallocate(h)
    with pytest.raises(kvcore.errors.InvalidHandleError):
        mgr.save(tmp_path / "c", [h])
    assert os.listdir(tmp_path) == []


def test_an_empty_save_loads_as_nothing_and_request_ids_are_checked(tmp_path):
    mgr = _manager()
    mgr.save(tmp_path / "none", [])
    assert mgr.load(tmp_path / "none") == []
    _, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match="1 sequences"):
        mgr.load(tmp_path / "good", request_ids=["x", "y"])
    with pytest.raises(ValueError, match="non-empty"):
        mgr.load(tmp_path / "good", request_ids=[""])
    mgr.close()
    with pytest.raises(kvcore.errors.ManagerClosedError):
        mgr.load(tmp_path / "good")


def test_managers_handles_and_mappings_refuse_copies_naming_fork_and_save():
    import copy
    import pickle

    mgr = _manager()
    h = mgr.allocate(AllocationRequest(request_id="a", num_tokens=2))
    mapping = mgr.extend(h, 1)
    for obj, names in ((mgr, ("manager.fork(", "manager.save(path, handles)", "load(path)")),
                       (h, ("clone_handle()", "manager.fork(handle")),
                       (mapping, ("extend",))):
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(kvcore.errors.NotCopyableError) as err:
                attempt(obj)
            assert isinstance(err.value, TypeError)
            assert all(name in str(err.value) for name in names), str(err.value)
    with pytest.raises(kvcore.errors.NotCopyableError, match=r"manager\.save\(path, \[handle\]\)"):
        pickle.dumps(h)


def test_a_load_shares_cached_blocks_only_under_its_own_extra_key(tmp_path):
    rng = np.random.default_rng(13)
    mgr = _manager()
    h = mgr.allocate(AllocationRequest(request_id="p", prompt_token_ids=list(range(9))))
    want = _fill(mgr, h, rng)
    mgr.save(tmp_path / "c", [h])
    [other_tenant] = mgr.load(tmp_path / "c", request_ids=["t"], extra_key="tenant-b")
    assert other_tenant.num_cached_tokens() == 0  # the salt separates it: all written
    [same] = mgr.load(tmp_path / "c", request_ids=["s"])
    assert same.num_cached_tokens() == 2 * BS
    [again] = mgr.load(tmp_path / "c", request_ids=["t2"], extra_key="tenant-b")
    assert again.num_cached_tokens() == 2 * BS  # tenant-b's own copy is cached now
    for handle in (other_tenant, same, again):
        assert _same(_read(mgr, handle), want)
    mgr.check_invariants()
