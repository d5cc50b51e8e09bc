"""A manager with a store (``CacheConfig(store=..., hash_key=...)``), in one process:
completed blocks are written behind through every write path, ``allocate`` reads the
next blocks of a prompt through, bit for bit, under the last-prompt-token rule and the
all-or-nothing rule; faults are misses; digests are exactly ``chain_keys``; no stale or
foreign block is ever served; secrets never show.  Real servers and processes:
tests/test_store_manager_redis.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest

import kvcore
import kvcore.metrics
from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.models import LayerGroup
from kvcore.errors import (OutOfBlocksError, StoreConfigError, StoreConnectionError,
                           UnknownStoreError, UnsupportedError)
from kvcore.stores import (MemoryStore, StoreNamespace, chain_keys, register_store,
                           unregister_store)

KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(32))
SHAPE = dict(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4)


def url() -> str:
    return f"memory://test-{uuid.uuid4().hex}"


def cfg(store: str | None = None, num_blocks: int = 64, **fields: Any) -> CacheConfig:
    store = fields.pop("store", store)
    if store is not None:
        fields.setdefault("hash_key", KEY)
    return CacheConfig(**{**SHAPE, **fields}, num_blocks=num_blocks, store=store)


def truth(tokens: list[int], layer: int, plane: int) -> np.ndarray:
    """K/V as a pure function of (prefix, position, layer): what a model would write."""
    t = np.asarray(tokens, dtype=np.float64)
    prefix = np.cumsum(t)[:, None, None]
    grid = np.arange(8, dtype=np.float64).reshape(1, 2, 4)
    return np.sin(prefix * 1e-3 + grid + 10 * layer + 5 * plane).astype(np.float32)


def prefill(mgr: KvCacheManager, rid: str, tokens: list[int], **req: Any) -> Any:
    """Allocate ``tokens`` and write what the cache did not serve, every layer."""
    h = mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=tokens, **req))
    done = h.num_cached_tokens()
    if done < len(tokens):
        for layer in range(mgr.config.num_layers):
            mgr.write(h, layer, truth(tokens, layer, 0)[done:], truth(tokens, layer, 1)[done:],
                      start=done)
    return h


def read(mgr: KvCacheManager, h: Any, layer: int) -> tuple[np.ndarray, np.ndarray]:
    pair = h.kv_cache(layer)
    if pair is None:  # nothing written
        empty = np.zeros((0, 2, 4), np.float32)
        return empty, empty
    k, v = pair
    return mgr.backend.to_numpy(k.native), mgr.backend.to_numpy(v.native)


def assert_holds(mgr: KvCacheManager, h: Any, tokens: list[int]) -> None:
    """Every token the sequence holds (served or written) is the truth, bit for bit."""
    for layer in range(mgr.config.num_layers):
        k, v = read(mgr, h, layer)
        n = k.shape[0]
        assert n == h.num_written(layer) >= h.num_cached_tokens()
        assert k.tobytes() == truth(tokens, layer, 0)[:n].tobytes(), layer
        assert v.tobytes() == truth(tokens, layer, 1)[:n].tobytes(), layer


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


def written(store_url: str, **fields: Any) -> KvCacheManager:
    """A manager that wrote prompt(1, 22) and closed (so its blocks are in the store)."""
    with KvCacheManager(cfg(store_url, **fields), backend="numpy") as mgr:
        prefill(mgr, "w", prompt(1, 22))
    return mgr


# --- the configuration ------------------------------------------------------------------


def test_a_store_needs_a_hash_key_and_says_how_to_make_one():
    with pytest.raises(pydantic.ValidationError, match=r"hash_key .*new_hash_key"):
        CacheConfig(**SHAPE, num_blocks=8, store="memory://x")


@pytest.mark.parametrize("fields, fragment", [
    (dict(hash_key=b"short"), "16..64 bytes, got 5 bytes"),
    (dict(hash_key="a-str-is-not-bytes-at-all-000000"), "got str"),
    (dict(store="no-scheme", hash_key=KEY), "store must be a URL"),
    (dict(store=3, hash_key=KEY), "got int"),
    (dict(store="memory://x", hash_key=KEY, enable_prefix_caching=False),
     "enable_prefix_caching=True"),
    (dict(store_options={"timeout": 1}), "store_options is set but store is not"),
    (dict(hash_key=KEY), "hash_key is used only with store"),
    (dict(store="memory://x", hash_key=KEY, store_namespace="a b"), "store_namespace"),
    (dict(store="memory://x", hash_key=KEY, model_id=""), "model_id"),
])
def test_bad_store_fields_are_refused_by_name(fields, fragment):
    fields.setdefault("store", None) if "store" not in fields else None
    with pytest.raises(pydantic.ValidationError, match=fragment):
        CacheConfig(**SHAPE, num_blocks=8, **fields)


def test_secrets_never_show_in_reprs_dumps_or_errors():
    secret = b"S3CRET-hash-key-0123456789abcdef"
    c = CacheConfig(**SHAPE, num_blocks=8, store="redis://:pa55word@h:6379/0", hash_key=secret,
                    store_options={"password": "opt-pa55", "timeout": 1})
    shown = [repr(c), str(c), c.model_dump_json()]
    for text in shown:
        for leak in ("S3CRET", "pa55word", "opt-pa55", secret.hex()):
            assert leak not in text, (leak, text)
    assert "redis://:***@h:6379/0" in repr(c) and "'timeout': 1" in repr(c)
    # An error about another field, with the secret among the input, shows no input.
    with pytest.raises(pydantic.ValidationError) as err:
        CacheConfig(**SHAPE, num_blocks=8, store="redis://:pa55word@h", hash_key=secret,
                    pressure_medium=0.99, pressure_high=0.5)
    assert "S3CRET" not in str(err.value) and "pa55word" not in str(err.value)
    # Python dumps keep the values (a copy of a config works); the secret stays wrapped.
    assert CacheConfig(**c.model_dump()).hash_key.get_secret_value() == secret
    with pytest.raises(pydantic.ValidationError):  # a JSON dump is not a way to move it
        CacheConfig.model_validate_json(c.model_dump_json())


def test_a_grouped_config_with_a_store_is_refused_saying_why():
    groups = (LayerGroup(layers=(0, 1)),
              LayerGroup(kind="sliding", layers=(2,), window=8))
    c = CacheConfig(**SHAPE, num_blocks=16, store=url(), hash_key=KEY, layer_groups=groups)
    with pytest.raises(UnsupportedError, match="layer_groups"):
        KvCacheManager(c, backend="numpy")


def test_unknown_schemes_and_options_are_refused_at_construction():
    with pytest.raises(UnknownStoreError):
        KvCacheManager(cfg("nosuchstore://x"), backend="numpy")
    with pytest.raises(StoreConfigError, match="wrong_option"):
        KvCacheManager(cfg(url(), store_options={"wrong_option": 1}), backend="numpy")
    with pytest.raises(StoreConfigError, match="strict"):
        KvCacheManager(cfg(url(), store_options={"strict": "yes"}), backend="numpy")
    with pytest.raises(StoreConfigError, match="queue_blocks"):
        KvCacheManager(cfg(url(), store_options={"queue_blocks": 0}), backend="numpy")
    with pytest.raises(StoreConfigError, match="close_timeout"):
        KvCacheManager(cfg(url(), store_options={"close_timeout": -1}), backend="numpy")


def test_without_a_store_the_hooks_are_absent_and_digests_take_no_room(config):
    mgr = KvCacheManager(config, backend="numpy")
    assert mgr._co.link is None and mgr._co.tables.digest.shape[1] == 0
    h = prefill(mgr, "a", prompt(2, 40))
    mgr.extend(h, 30, token_ids=prompt(3, 30))
    assert mgr._co.tables.digest.shape[1] == 0
    with pytest.raises(UnsupportedError, match="crypto_block_keys"):
        mgr.block_digests(h)
    assert mgr.store_stats() is None and mgr.flush_store() is True
    assert mgr.stats().store_hits == 0


# --- digests ----------------------------------------------------------------------------


def test_block_digests_are_chain_keys_through_allocate_chunks_and_decode_steps():
    tokens = prompt(4, 50)
    mgr = KvCacheManager(cfg(None, crypto_block_keys=True, hash_key=KEY), backend="numpy")
    h = mgr.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens[:10],
                                       extra_key="tenant"))
    mgr.extend(h, 13, token_ids=tokens[10:23])  # a chunk
    child = mgr.fork(h, "b")
    for t in tokens[23:]:                         # decode steps, with a fork alongside
        mgr.extend_batch([h, child], 1, token_ids=[[t], [t]])
    full = 50 // 4
    expect = chain_keys(None, np.array(tokens[:full * 4]).reshape(full, 4), "tenant", KEY)
    assert mgr.block_digests(h) == expect and mgr.block_digests(child) == expect
    # A prompt hitting the prefix cache gets the same digests (read back from the blocks).
    for layer in range(3):
        mgr.write(h, layer, truth(tokens, layer, 0), truth(tokens, layer, 1), start=0)
    again = mgr.allocate(AllocationRequest(request_id="c", prompt_token_ids=tokens[:41],
                                           extra_key="tenant"))
    assert again.num_cached_tokens() == 40
    assert mgr.block_digests(again) == expect[:10]


def test_crypto_block_keys_without_a_hash_key_use_a_secret_of_the_managers_own():
    tokens = prompt(5, 16)
    a = KvCacheManager(cfg(None, crypto_block_keys=True), backend="numpy")
    b = KvCacheManager(cfg(None, crypto_block_keys=True), backend="numpy")
    da = a.block_digests(prefill(a, "x", tokens))
    db = b.block_digests(prefill(b, "x", tokens))
    assert len(da) == len(db) == 4 and set(da).isdisjoint(db)


def test_truncating_and_rewriting_a_block_never_offers_its_old_digest():
    """The adversarial case: a block recorded under one prefix, truncated and filled again
    in place with other K/V and no token ids.  It must not reach the store under the old
    key.  (The block is a second copy of a prompt whose key another sequence holds, so
    truncate resets it in place instead of copying it.)"""
    u = url()
    tokens = prompt(6, 13)
    with KvCacheManager(cfg(u), backend="numpy") as mgr:
        owner = mgr.allocate(AllocationRequest(request_id="owner", prompt_token_ids=tokens))
        h = mgr.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens))
        assert h.num_cached_tokens() == 0  # the owner's blocks are not written: no hit
        for layer in range(3):  # every layer but the last block of layer 2
            n = 13 if layer < 2 else 8
            mgr.write(h, layer, truth(tokens, layer, 0)[:n], truth(tokens, layer, 1)[:n],
                      start=0)
        block = int(mgr._co.groups[0].table.blocks[mgr._seqs["a"].row, 2])
        mgr.truncate(h, 9)                    # block 2 (tokens 8..11) partly kept
        assert int(mgr._co.groups[0].table.blocks[mgr._seqs["a"].row, 2]) == block
        mgr.extend(h, 4)                      # no token ids: the chain stops here
        junk = np.full((4, 2, 4), 7.0, np.float32)
        for layer in range(3):
            mgr.write(h, layer, junk, junk, start=8 if layer == 2 else 9)
        assert mgr._co.groups[0].store.complete[block]  # complete again, with junk
        mgr.deallocate(owner)
        mgr.flush_store(10)
        assert mgr.store_stats().blocks_offered == 2  # blocks 0 and 1 only
    reader = KvCacheManager(cfg(u), backend="numpy")
    r = reader.allocate(AllocationRequest(request_id="r", prompt_token_ids=tokens))
    assert r.num_cached_tokens() == 8  # block 2 never travelled
    assert_holds(reader, r, tokens)


# --- write-behind and read-through ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_second_manager_is_served_the_prompt_bit_for_bit(dtype):
    u = url()
    tokens = prompt(7, 22)  # five full blocks and two tokens
    odd = np.array([-0.0, 1e-45 if dtype == "float32" else 6e-8, np.inf, -np.inf],
                   dtype=np.float32)
    with KvCacheManager(cfg(u, dtype=dtype), backend="numpy") as a:
        h = a.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens))
        bits = np.random.default_rng(0).integers(0, 2**16 if dtype == "float16" else 2**32,
                                                 (3, 2, 22, 2, 4), dtype=np.uint64)
        planes = bits.astype(np.uint16 if dtype == "float16" else np.uint32).view(dtype)
        planes[0, 0, 0, 0, :] = odd.astype(dtype)  # -0.0, a subnormal, infinities
        for layer in range(3):
            a.write(h, layer, planes[layer, 0], planes[layer, 1])
        assert a.flush_store(10)
        assert a.stats().store_blocks_written == 5
    b = KvCacheManager(cfg(u, dtype=dtype), backend="numpy")
    r = b.allocate(AllocationRequest(request_id="b", prompt_token_ids=tokens))
    assert r.num_cached_tokens() == 20
    for layer in range(3):
        k, v = read(b, r, layer)
        assert k.tobytes() == planes[layer, 0, :20].tobytes()  # NaN payloads included
        assert v.tobytes() == planes[layer, 1, :20].tobytes()
    s = b.stats()
    assert (s.store_hits, s.store_hit_tokens, s.store_misses) == (5, 20, 0)
    assert s.prefix_cache_hits == 0 and s.prefix_cache_queries == 5  # local hits apart
    assert s.store_bytes_loaded > 5 * 3 * 2 * 4 * 8 * np.dtype(dtype).itemsize
    b.check_invariants()
    # Loaded blocks are local prefix hits now, and are not offered back.
    again = b.allocate(AllocationRequest(request_id="c", prompt_token_ids=tokens))
    assert again.num_cached_tokens() == 20 and b.stats().prefix_cache_hits == 5
    assert b.store_stats().blocks_offered == 0 and b.stats().store_hits == 5


def test_the_last_prompt_token_is_computed_unless_a_full_hit_is_allowed():
    u = url()
    tokens = prompt(8, 16)  # exactly four blocks
    written_mgr = KvCacheManager(cfg(u), backend="numpy")
    prefill(written_mgr, "w", tokens)
    written_mgr.close()
    b = KvCacheManager(cfg(u), backend="numpy")
    assert b.allocate(AllocationRequest(request_id="x", prompt_token_ids=tokens)
                      ).num_cached_tokens() == 12
    assert b.stats().store_hits == 3
    c = KvCacheManager(cfg(u), backend="numpy")
    full = c.allocate(AllocationRequest(request_id="y", prompt_token_ids=tokens,
                                        allow_full_hit=True))
    assert full.num_cached_tokens() == 16
    assert_holds(c, full, tokens)


def test_local_hits_come_first_then_the_store_serves_the_rest():
    u = url()
    tokens = prompt(9, 30)
    written(u)  # another prompt
    a = KvCacheManager(cfg(u), backend="numpy")
    prefill(a, "a", tokens)
    a.flush_store(10)
    b = KvCacheManager(cfg(u), backend="numpy")
    prefill(b, "local", tokens[:9])  # two full blocks local, not more
    assert b.stats().store_hits == 2  # the short prompt was served by the store too
    r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=tokens))
    assert r.num_cached_tokens() == 28
    s = b.stats()
    assert s.prefix_cache_hits == 2 and s.store_hits == 2 + 5  # 2 local, then 5 stored
    assert_holds(b, r, tokens)
    b.check_invariants()


def test_a_partial_run_stops_at_the_first_missing_block():
    u = url()
    tokens = prompt(10, 26)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        prefill(a, "a", tokens)
    ns = StoreNamespace.from_config(cfg(u))
    digests = chain_keys(None, np.array(tokens[:24]).reshape(6, 4), None, KEY)
    name = u[len("memory://"):]
    store = MemoryStore(name)
    assert store.delete([ns.key(digests[3])]) == 1  # a hole at block 3
    store.close()
    b = KvCacheManager(cfg(u), backend="numpy")
    r = prefill(b, "r", tokens)
    assert r.num_cached_tokens() == 12
    assert (b.stats().store_hits, b.stats().store_misses) == (3, 3)
    assert_holds(b, r, tokens)


def test_decode_steps_offer_the_blocks_they_complete_through_the_fast_path():
    u = url()
    tokens = prompt(11, 6)
    gen = prompt(12, 14)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        hs = [prefill(a, f"s{i}", tokens) for i in range(1)]
        h = hs[0]
        seq = list(tokens)
        for t in gen:  # one batched write per layer per step: the fast path
            m = a.extend_batch([h], 1, token_ids=[[t]])
            seq.append(t)
            for layer in range(3):
                a.write_slots(layer, m, truth(seq, layer, 0)[-1:], truth(seq, layer, 1)[-1:])
        a.stats()  # settles the last step
        assert a.flush_store(10)
        assert a.store_stats().blocks_offered == 5  # 20 tokens: 5 full blocks
    b = KvCacheManager(cfg(u), backend="numpy")
    r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=seq + [1]))
    assert r.num_cached_tokens() == 20
    assert_holds(b, r, seq)


def test_the_checked_write_slots_path_offers_too():
    u = url()
    tokens = prompt(13, 8)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        h = a.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens[:3]))
        m = a.extend(h, 5, token_ids=tokens[3:])  # several tokens: not the decode fast path
        for layer in range(3):
            a.write(h, layer, truth(tokens, layer, 0)[:3], truth(tokens, layer, 1)[:3],
                    start=0)
        for layer in range(3):
            a.write_slots(layer, m, truth(tokens, layer, 0)[3:], truth(tokens, layer, 1)[3:])
        assert a.flush_store(10) and a.store_stats().blocks_offered == 2
    b = KvCacheManager(cfg(u), backend="numpy")
    r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=tokens + [5]))
    assert r.num_cached_tokens() == 8
    assert_holds(b, r, tokens)


def test_a_fork_that_writes_its_own_tokens_shares_only_the_common_prefix():
    u = url()
    tokens = prompt(14, 6)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        h = prefill(a, "a", tokens)
        child = a.fork(h, "b")
        tails = {"a": prompt(15, 6), "b": prompt(16, 6)}
        for rid, handle in (("a", h), ("b", child)):
            seq = tokens + tails[rid]
            a.extend(handle, 6, token_ids=tails[rid])
            for layer in range(3):
                a.write(handle, layer, truth(seq, layer, 0)[6:], truth(seq, layer, 1)[6:])
        assert a.flush_store(10)
    for rid in ("a", "b"):
        seq = tokens + tails[rid]
        b = KvCacheManager(cfg(u), backend="numpy")
        r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=seq + [0]))
        assert r.num_cached_tokens() == 12
        assert_holds(b, r, seq)


@pytest.mark.parametrize("change, hits", [
    ({}, 5), ({"extra_key": "other-tenant"}, 0), ({"hash_key": OTHER_KEY}, 0),
    ({"model_id": "other-model"}, 0), ({"store_namespace": "other"}, 0),
])
def test_only_the_same_salt_secret_model_and_namespace_share(change, hits):
    u = url()
    written(u, model_id="m")
    extra = change.pop("extra_key", None)
    fields = {"model_id": "m", **change}
    b = KvCacheManager(cfg(u, **fields), backend="numpy")
    r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=prompt(1, 22),
                                     extra_key=extra))
    assert r.num_cached_tokens() == 4 * hits and b.stats().store_hits == hits


def test_a_salted_prompt_is_shared_only_under_its_salt():
    u = url()
    tokens = prompt(17, 9)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        prefill(a, "a", tokens, extra_key="tenant-a")
    b = KvCacheManager(cfg(u), backend="numpy")
    assert b.allocate(AllocationRequest(request_id="n", prompt_token_ids=tokens)
                      ).num_cached_tokens() == 0
    assert b.allocate(AllocationRequest(request_id="b", prompt_token_ids=tokens,
                                        extra_key="tenant-b")).num_cached_tokens() == 0
    r = b.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens,
                                     extra_key="tenant-a"))
    assert r.num_cached_tokens() == 8
    assert_holds(b, r, tokens)


# --- all or nothing, faults ------------------------------------------------------------------


def _state(mgr: KvCacheManager) -> tuple:
    s = mgr.stats().model_dump()
    return (s, sorted(mgr._seqs), mgr._co.tables.length.copy().tolist())


def test_a_request_that_does_not_fit_asks_the_store_nothing_and_changes_nothing():
    u = url()
    written(u)
    b = KvCacheManager(cfg(u, num_blocks=4), backend="numpy")
    before, lookups = _state(b), b.store_stats().lookups
    with pytest.raises(OutOfBlocksError):
        b.allocate(AllocationRequest(request_id="r", prompt_token_ids=prompt(1, 22)))
    after = _state(b)
    assert after[1:] == before[1:] and b.store_stats().lookups == lookups
    assert after[0]["store_hits"] == 0 and after[0]["allocation_failures"] == 1


class FlakyStore(MemoryStore):
    """``flaky://NAME``: a memory store whose calls fail while ``FlakyStore.down``."""

    name = "flaky"
    schemes = ("flaky",)
    down = False

    def _check(self) -> None:
        if FlakyStore.down:
            raise StoreConnectionError("flaky store is down")

    def _put(self, items: list) -> None:
        self._check()
        super()._put(items)

    def _get(self, keys: list) -> list:
        self._check()
        return super()._get(keys)

    def _exists(self, keys: list) -> list:
        self._check()
        return super()._exists(keys)


@pytest.fixture
def flaky() -> Iterator[str]:
    register_store(FlakyStore, replace_existing=True)
    FlakyStore.down = False
    try:
        yield f"flaky://t-{uuid.uuid4().hex}"
    finally:
        FlakyStore.down = False
        unregister_store("flaky")


def test_a_store_that_fails_is_a_miss_and_the_cache_works_on(flaky):
    written(flaky)
    FlakyStore.down = True
    b = KvCacheManager(cfg(flaky, store_options={"failure_threshold": 2, "cooldown_s": 60}),
                       backend="numpy")
    for i in range(4):  # served locally after the first
        r = prefill(b, f"r{i}", prompt(1, 22))
        assert r.num_cached_tokens() == (0 if i == 0 else 20)
        assert_holds(b, r, prompt(1, 22))
        prefill(b, f"o{i}", prompt(100 + i, 9))  # new prompts: lookups, and offers
    b.flush_store(10)
    s = b.stats()
    assert s.store_hits == 0 and s.store_errors >= 2 and s.store_dropped_writes > 0
    assert b.store_stats().breaker_state.value == "open"
    b.check_invariants()
    b.close()  # closing a manager whose store is down is not an error


def test_strict_mode_raises_from_allocate_and_changes_nothing(flaky):
    written(flaky)
    FlakyStore.down = True
    b = KvCacheManager(cfg(flaky, store_options={"strict": True}), backend="numpy")
    prefill(b, "local", prompt(50, 4))  # no block to ask the store for: no error
    before = _state(b)
    with pytest.raises(StoreConnectionError, match="flaky store is down"):
        b.allocate(AllocationRequest(request_id="r", prompt_token_ids=prompt(1, 22)))
    assert _state(b)[1:] == before[1:]
    assert "r" not in b
    FlakyStore.down = False
    r = b.allocate(AllocationRequest(request_id="r", prompt_token_ids=prompt(1, 22)))
    assert r.num_cached_tokens() == 20
    assert_holds(b, r, prompt(1, 22))


def test_a_corrupt_value_is_a_miss_counted_and_deleted(tmp_path: Path):
    u = f"file://{tmp_path}/store"
    tokens = prompt(18, 22)
    with KvCacheManager(cfg(u), backend="numpy") as a:
        prefill(a, "a", tokens)
    files = sorted((tmp_path / "store").rglob("*.kvb")) or sorted(
        p for p in (tmp_path / "store").rglob("*") if p.is_file())
    ns = StoreNamespace.from_config(cfg(u))
    digests = chain_keys(None, np.array(tokens[:20]).reshape(5, 4), None, KEY)
    victim = [p for p in files if digests[2].hex() in p.name]
    assert len(victim) == 1, [p.name for p in files]
    data = bytearray(victim[0].read_bytes())
    data[-3] ^= 0x40  # one bit of the payload
    victim[0].write_bytes(bytes(data))
    b = KvCacheManager(cfg(u), backend="numpy")
    r = prefill(b, "r", tokens)
    assert r.num_cached_tokens() == 8  # blocks 0, 1; block 2 is damaged
    assert_holds(b, r, tokens)
    s = b.stats()
    assert s.store_corrupt_misses == 1 and s.store_hits == 2 and s.store_misses == 3
    b.flush_store(10)  # the delete runs on the writer thread; then b's own copy is sent
    assert b.store_stats().deleted_values == 1
    assert victim[0].read_bytes() != bytes(data)  # replaced by b's write-behind
    c = KvCacheManager(cfg(u), backend="numpy")
    r = prefill(c, "c", tokens)
    assert r.num_cached_tokens() == 20 and c.stats().store_corrupt_misses == 0
    assert_holds(c, r, tokens)
    assert ns.key(digests[2]).endswith(digests[2].hex())


def test_a_full_queue_drops_and_counts_instead_of_waiting():
    u = url()
    with KvCacheManager(cfg(u, store_options={"queue_blocks": 1, "batch_blocks": 1}),
                        backend="numpy") as a:
        for i in range(6):
            prefill(a, f"a{i}", prompt(200 + i, 17))
        a.flush_store(10)
        s = a.stats()
        assert s.store_dropped_writes > 0
        assert s.store_blocks_written + s.store_dropped_writes == 24


def test_close_flushes_the_queue_and_closes_the_store():
    u = url()
    a = KvCacheManager(cfg(u), backend="numpy")
    prefill(a, "a", prompt(19, 22))
    a.close()
    assert a.closed and a._link.connector.stats().blocks_written == 5  # type: ignore[union-attr]
    b = KvCacheManager(cfg(u), backend="numpy")
    assert prefill(b, "b", prompt(19, 22)).num_cached_tokens() == 20


def test_authenticated_values_refuse_a_reader_without_the_mac():
    u = url()
    written(u, store_options={"authenticate": True})
    plain = KvCacheManager(cfg(u), backend="numpy")  # same keys, no MAC expected
    assert prefill(plain, "p", prompt(1, 22)).num_cached_tokens() == 0
    assert plain.stats().store_corrupt_misses == 1
    signed = KvCacheManager(cfg(u, store_options={"authenticate": True}), backend="numpy")
    r = prefill(signed, "s", prompt(1, 22))
    assert r.num_cached_tokens() in (0, 20)  # the plain reader deleted block 0's value


def test_the_disk_store_survives_a_restart(tmp_path: Path):
    u = f"file://{tmp_path}/kv"
    prompts = [prompt(300 + i, 18 + 5 * i) for i in range(3)]
    with KvCacheManager(cfg(u), backend="numpy") as a:
        for i, tokens in enumerate(prompts):
            prefill(a, f"a{i}", tokens)
    # A new manager (a restarted process would be the same) finds every old prefix.
    with KvCacheManager(cfg(u), backend="numpy") as b:
        for i, tokens in enumerate(prompts):
            r = prefill(b, f"b{i}", tokens)
            assert r.num_cached_tokens() == (len(tokens) - 1) // 4 * 4
            assert_holds(b, r, tokens)
        assert b.stats().store_misses == 0


def test_stats_add_the_store_fields_and_metrics_export_them():
    u = url()
    written(u)
    b = KvCacheManager(cfg(u), backend="numpy")
    prefill(b, "r", prompt(1, 22))
    names = {s.field: s.kind for s in kvcore.metrics.metric_specs()}
    s = b.stats()
    for field in ("store_hits", "store_misses", "store_bytes_loaded", "store_bytes_stored",
                  "store_dropped_writes", "store_errors", "store_corrupt_misses"):
        assert names[field] == "counter", field
    assert names["store_queued_blocks"] == "gauge"
    assert s.store_hits == 5 and s.store_bytes_loaded > 0
    line = kvcore.metrics.format_stats(s)
    assert "store_hits=5" in line


# --- blocks copied by the writer thread -----------------------------------------------------


class GatedStore(MemoryStore):
    """``gated://NAME``: a memory store whose writer-side calls wait for ``gate``."""

    name = "gated"
    schemes = ("gated",)
    gate: Any = None

    def _exists(self, keys: list) -> list:
        if GatedStore.gate is not None:
            GatedStore.gate.wait(30)
        return super()._exists(keys)


@pytest.fixture
def gated() -> Iterator[str]:
    import threading
    register_store(GatedStore, replace_existing=True)
    GatedStore.gate = threading.Event()
    try:
        yield f"gated://t-{uuid.uuid4().hex}"
    finally:
        GatedStore.gate.set()
        GatedStore.gate = None
        unregister_store("gated")


def test_a_block_reused_before_the_writer_copies_it_is_not_written(gated):
    """Completed blocks of host pools are copied by the writer thread later.  Here the
    writer is held while the engine frees the prompt's blocks, drops them from the
    prefix cache and writes another prompt into the very same blocks: when the writer
    runs, it must notice and write nothing of them."""
    tokens, other = prompt(20, 9), prompt(21, 9)
    mgr = KvCacheManager(cfg(gated, num_blocks=4), backend="numpy")
    h = prefill(mgr, "a", tokens)  # blocks 0, 1 complete: offered, writer held
    first = mgr._co.groups[0].table.blocks[mgr._seqs["a"].row, :2].tolist()
    mgr.deallocate(h)
    mgr.gc()                                   # forgotten: free, empty
    h2 = prefill(mgr, "b", other)              # the same blocks, other K/V
    assert mgr._co.groups[0].table.blocks[mgr._seqs["b"].row, :2].tolist() == first
    GatedStore.gate.set()
    assert mgr.flush_store(10)
    s = mgr.store_stats()
    assert s.blocks_changed == 2 and s.blocks_written == 2  # only b's own blocks
    mgr.close()
    reader = KvCacheManager(cfg(gated), backend="numpy")
    assert prefill(reader, "r", tokens).num_cached_tokens() == 0
    r = prefill(reader, "r2", other)
    assert r.num_cached_tokens() == 8
    assert_holds(reader, r, other)
    del h2


def test_closing_while_the_writer_is_held_releases_the_pools_safely(gated):
    mgr = KvCacheManager(cfg(gated, store_options={"close_timeout": 0.2}), backend="numpy")
    for i in range(3):
        prefill(mgr, f"a{i}", prompt(30 + i, 17))
    mgr.close()  # the writer is stuck in the store: the queue is dropped, pools released
    GatedStore.gate.set()
    conn = mgr._link.connector  # type: ignore[union-attr]
    conn._worker.join(10)  # it resumes, finds the pools gone, copies nothing
    assert not conn._worker.is_alive()
    s = conn.stats()
    assert s.blocks_written == 0 and s.dropped_writes + s.blocks_changed >= 8
    assert mgr.closed


def test_torch_bfloat16_blocks_travel_bit_for_bit_nan_payloads_included():
    import torch
    u = url()
    tokens = prompt(40, 13)
    bits = np.random.default_rng(5).integers(0, 2**16, (3, 2, 13, 2, 4), dtype=np.uint16)
    bits[0, 0, 0, 0, :4] = [0x7FC1, 0xFF81, 0x8000, 0x0001]  # NaN payloads, -0, subnormal
    planes = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    with KvCacheManager(cfg(u, dtype="bfloat16"), backend="torch") as a:
        h = a.allocate(AllocationRequest(request_id="a", prompt_token_ids=tokens))
        for layer in range(3):
            a.write(h, layer, planes[layer, 0], planes[layer, 1])
    b = KvCacheManager(cfg(u, dtype="bfloat16"), backend="torch")
    r = b.allocate(AllocationRequest(request_id="b", prompt_token_ids=tokens))
    assert r.num_cached_tokens() == 12
    for layer in range(3):
        for plane, ref in enumerate(r.kv_cache(layer)):
            got = ref.native.view(torch.int16).numpy().view(np.uint16)
            assert got.tobytes() == bits[layer, plane, :12].tobytes(), (layer, plane)


# --- an adversarial random run -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_runs_never_put_a_wrong_block_in_the_store(seed):
    """A writer does random things (shared prompts, decode steps, chunks with and
    without token ids, truncation and continuing differently, forks, frees, gc and a
    reset, a small pool that evicts) writing the truth wherever token ids are known
    and junk where they are not.  Then fresh readers ask for every token sequence that
    was ever recorded: whatever the store serves must be the truth of that prefix."""
    rng = np.random.default_rng(seed)
    u = url()
    mgr = KvCacheManager(cfg(u, num_blocks=48), backend="numpy")
    stems = [prompt(1000 + i, int(rng.integers(4, 14))) for i in range(3)]
    live: dict[str, list[int | None]] = {}  # rid -> tokens (None: written without ids)
    seen: list[list[int]] = []
    serial = 0

    def write_new(rid: str, seq: list[int | None], start: int) -> None:
        h = mgr.get_handle(rid)
        known = [t for t in seq[:len(seq)]] if None not in seq else None
        for layer in range(3):
            if known is not None:
                k, v = truth(known, layer, 0)[start:], truth(known, layer, 1)[start:]
            else:
                k = v = np.full((len(seq) - start, 2, 4), -3.0, np.float32)
            mgr.write(h, layer, k, v, start=start)

    for _ in range(120):
        op = rng.integers(0, 9)
        try:
            if op <= 1 or not live:  # a prompt sharing a stem
                stem = stems[int(rng.integers(0, 3))]
                tokens = stem + prompt(int(rng.integers(1 << 30)), int(rng.integers(1, 12)))
                serial += 1
                rid = f"r{serial}"
                h = mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=tokens))
                live[rid] = list(tokens)
                write_new(rid, live[rid], h.num_cached_tokens())
                seen.append(list(tokens))
            else:
                rid = list(live)[int(rng.integers(0, len(live)))]
                seq = live[rid]
                h = mgr.get_handle(rid)
                if op <= 3:  # a decode step or a chunk, with ids (when the chain is intact)
                    n = int(rng.integers(1, 6))
                    new = prompt(int(rng.integers(1 << 30)), n)
                    ids = None if None in seq else new
                    mgr.extend(h, n, token_ids=ids)
                    seq.extend(new if ids is not None else [None] * n)
                    write_new(rid, seq, len(seq) - n)
                    if ids is not None:
                        seen.append(list(seq))
                elif op == 4:  # tokens whose ids are not given: junk K/V
                    n = int(rng.integers(1, 6))
                    mgr.extend(h, n)
                    seq.extend([None] * n)
                    write_new(rid, seq, len(seq) - n)
                elif op == 5:  # roll back, then continue differently
                    keep = int(rng.integers(0, len(seq) + 1))
                    mgr.truncate(h, keep)
                    del seq[keep:]
                elif op == 6:
                    serial += 1
                    child = f"r{serial}"
                    mgr.fork(h, child)
                    live[child] = list(seq)
                elif op == 7:
                    mgr.deallocate(h)
                    del live[rid]
                else:
                    (mgr.gc if rng.random() < 0.7 else mgr.reset_prefix_cache)()
        except OutOfBlocksError:
            for rid in list(live)[:2]:
                mgr.deallocate(rid)
                del live[rid]
        mgr.check_invariants()
    mgr.close()
    assert mgr._link.connector.stats().blocks_written > 0  # type: ignore[union-attr]
    served = 0
    for i, tokens in enumerate(seen):
        reader = KvCacheManager(cfg(u), backend="numpy")
        r = reader.allocate(AllocationRequest(request_id="r", prompt_token_ids=tokens,
                                              allow_full_hit=True))
        assert r.num_cached_tokens() % 4 == 0
        assert_holds(reader, r, tokens)
        served += r.num_cached_tokens()
        reader.close()
    assert served > 0


def test_configs_with_store_options_hash_and_compare_by_value():
    fields = dict(store="memory://x", hash_key=KEY, store_options={"timeout": 1})
    a, b = cfg(**fields), cfg(**fields)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != cfg(**{**fields, "store_options": {"timeout": 2}})


def test_strict_mode_raises_failed_writes_from_flush_store(flaky):
    mgr = KvCacheManager(cfg(flaky, store_options={"strict": True}), backend="numpy")
    FlakyStore.down = True
    prefill(mgr, "a", prompt(60, 4))  # one block, nothing to look up: only a write
    with pytest.raises(StoreConnectionError, match="flaky store is down"):
        mgr.flush_store(10)
    assert mgr.flush_store(10)  # raised once
    FlakyStore.down = False
    mgr.close()
