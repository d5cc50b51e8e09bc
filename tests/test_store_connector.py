"""StoreConnector: write-behind that never waits, read-through of the leading run,
faults that are counted misses (never wrong data, never a crash), the breaker, strict
mode, and bad input refused before anything is queued."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest

import kvcore
from kvcore.errors import (DtypeMismatchError, ShapeMismatchError, StoreClosedError,
                           StoreConfigError, StoreConnectionError, StoreKeyError,
                           StorePartialError, StoreTimeoutError, StoreUnavailableError)
from kvcore.stores import (BreakerState, MemoryStore, StoreConnector, StoreNamespace,
                           block_layout, chain_keys, encode_block)

HASH_KEY = b"connector-test-hash-key-01234567"
CFG = kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16",
                         block_size=4, num_blocks=16)
LAYOUT = block_layout(CFG)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FaultyStore(MemoryStore):
    """A memory store whose calls can be made to fail, hang or misbehave."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None  # put waits on it when set
        self.calls = {"get": 0, "put": 0, "exists": 0, "delete": 0}
        self.get_override = None

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] += 1
        if self.fail is not None:
            raise self.fail

    def _get(self, keys):
        self._maybe_fail("get")
        if self.get_override is not None:
            return self.get_override(keys)
        return super()._get(keys)

    def _put(self, items):
        self._maybe_fail("put")
        if self.gate is not None:
            self.gate.wait(30)
        super()._put(items)

    def _exists(self, keys):
        self._maybe_fail("exists")
        return super()._exists(keys)

    def _delete(self, keys):
        self._maybe_fail("delete")
        return super()._delete(keys)


@pytest.fixture
def store():
    name = f"conn-{uuid.uuid4().hex}"
    s = FaultyStore(name)
    yield s
    MemoryStore.drop(name)


@pytest.fixture
def ns():
    return StoreNamespace.from_config(CFG, model_id="m")


def digests(n: int, salt: str | None = None) -> list[bytes]:
    return chain_keys(None, np.arange(4 * n).reshape(n, 4), salt, HASH_KEY)


def blocks(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 2**16, s.shape, dtype=np.uint16).view(np.float16)
             for s in LAYOUT] for _ in range(n)]


def same(run, sent) -> bool:
    return len(run) == len(sent) and all(
        a.tobytes() == b.tobytes() and a.shape == b.shape and a.dtype == b.dtype
        for r, s in zip(run, sent) for a, b in zip(r, s))


def connector(store, ns, **kw) -> StoreConnector:
    kw.setdefault("close_store", False)
    return StoreConnector(store, ns, LAYOUT, **kw)


# --- the happy path -----------------------------------------------------------------------


def test_offered_blocks_come_back_bit_identical_as_the_leading_run(store, ns):
    ds, bs = digests(8), blocks(8)
    with connector(store, ns) as conn:
        assert conn.offer(list(zip(ds[:3] + ds[4:6], bs[:3] + bs[4:6]))) == 5
        assert conn.flush(10)
        run = conn.fetch_run(ds)
        assert same(run, bs[:3])  # block 3 was never written: the run stops there
        stats = conn.stats()
    assert (stats.lookups, stats.hits, stats.misses, stats.blocks_written) == (1, 3, 5, 5)
    assert stats.hit_rate == pytest.approx(3 / 8)
    assert stats.bytes_read == 3 * stats.bytes_written // 5 > 3 * 2 * 2 * 4 * 4 * 2 * 2
    assert json.loads(stats.model_dump_json())["breaker_state"] == "closed"


def test_fetch_run_asks_the_store_once_for_all_keys(store, ns):
    with connector(store, ns) as conn:
        conn.offer(list(zip(digests(6), blocks(6))))
        conn.flush(10)
        before = store.calls["get"]
        assert len(conn.fetch_run(digests(6))) == 6
        assert store.calls["get"] == before + 1
        assert conn.fetch_run([]) == [] and store.calls["get"] == before + 1


def test_blocks_already_stored_are_not_sent_again(store, ns):
    with connector(store, ns) as conn:
        conn.offer(list(zip(digests(4), blocks(4))))
        conn.flush(10)
        written = conn.stats().bytes_written
        conn.offer(list(zip(digests(4), blocks(4))))
        conn.flush(10)
        stats = conn.stats()
    assert stats.blocks_skipped_existing == 4 and stats.bytes_written == written


def test_other_namespaces_salts_and_models_never_share(store, ns):
    with connector(store, ns) as conn:
        conn.offer(list(zip(digests(3, "tenant-a"), blocks(3))))
        conn.flush(10)
        assert conn.fetch_run(digests(3, "tenant-b")) == []
        assert len(conn.fetch_run(digests(3, "tenant-a"))) == 3
    for other in (StoreNamespace.from_config(CFG, model_id="m2"),
                  StoreNamespace.from_config(CFG, model_id="m", namespace="other")):
        with connector(store, other) as conn:
            assert conn.fetch_run(digests(3, "tenant-a")) == []


# --- write-behind never waits --------------------------------------------------------------


def test_offer_never_waits_for_a_stuck_store_and_counts_what_it_drops(store, ns):
    store.gate = threading.Event()  # the store hangs on put until released
    conn = connector(store, ns, queue_blocks=4, batch_blocks=2, skip_existing=False)
    done = []

    def offer_many():
        done.append(sum(conn.offer([(d, b)]) for d, b in zip(digests(20), blocks(20))))

    t = threading.Thread(target=offer_many)
    t.start()
    t.join(10)
    assert not t.is_alive(), "offer blocked on a stuck store"
    accepted = done[0]
    assert 4 <= accepted <= 6  # the queue (4) plus at most one batch taken by the worker
    assert conn.stats().dropped_writes == 20 - accepted
    store.gate.set()
    assert conn.flush(10)
    assert conn.stats().blocks_written == accepted
    conn.close()


def test_queue_bytes_bound_drops_too(store, ns):
    store.gate = threading.Event()
    one = sum(a.nbytes for a in blocks(1)[0])
    conn = connector(store, ns, queue_bytes=3 * one, batch_blocks=1, skip_existing=False)
    accepted = conn.offer(list(zip(digests(10), blocks(10))))
    assert 3 <= accepted <= 4 and conn.stats().dropped_writes == 10 - accepted
    assert conn.stats().queue_bytes <= 3 * one
    store.gate.set()
    conn.close()


# --- faults are misses -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bitflip", "foreign-ns",
                                    "other-key", "empty"])
def test_damaged_values_are_counted_misses_and_deleted(store, ns, damage):
    ds, bs = digests(4), blocks(4)
    with connector(store, ns) as conn:
        conn.offer(list(zip(ds, bs)))
        conn.flush(10)
        key = ns.key(ds[2])
        (good,) = store.get([key])
        bad = {
            "garbage": b"not a block at all",
            "truncated": good[:-1],
            "bitflip": good[:-10] + bytes([good[-10] ^ 1]) + good[-9:],
            "foreign-ns": encode_block(StoreNamespace.from_config(CFG).fingerprint, bs[2],
                                       key=ds[2], labels=[s.label for s in LAYOUT]),
            "other-key": store.get([ns.key(ds[1])])[0],  # a valid value, wrong place
            "empty": b"",
        }[damage]
        store.put([(key, bad)])
        run = conn.fetch_run(ds)
        assert same(run, bs[:2])  # never block 2's damaged bytes, never block 1's for 2
        conn.flush(10)
        stats = conn.stats()
        assert (stats.corrupt_values, stats.deleted_values, stats.errors) == (1, 1, 0)
        assert store.get([key]) == [None]


def test_a_mac_connector_and_a_plain_one_never_accept_each_others_values(store, ns):
    ds, bs = digests(2), blocks(2)
    with connector(store, ns, mac_key=b"m" * 32, delete_corrupt=False) as signed:
        signed.offer(list(zip(ds, bs)))
        signed.flush(10)
        assert same(signed.fetch_run(ds), bs)
    with connector(store, ns, delete_corrupt=False) as plain:
        assert plain.fetch_run(ds) == [] and plain.stats().corrupt_values == 1
    with connector(store, ns, mac_key=b"x" * 32, delete_corrupt=False) as wrong_key:
        assert wrong_key.fetch_run(ds) == [] and wrong_key.stats().corrupt_values == 1


def test_store_errors_are_misses_and_the_breaker_opens_then_recovers(store, ns):
    clock = Clock()
    ds, bs = digests(3), blocks(3)
    conn = connector(store, ns, failure_threshold=3, cooldown_s=5.0, clock=clock)
    conn.offer(list(zip(ds, bs)))
    conn.flush(10)
    store.fail = StoreTimeoutError("store memory://x: GET timed out")
    for _ in range(3):
        assert conn.fetch_run(ds) == []
    assert conn.breaker_state is BreakerState.open
    calls = store.calls["get"]
    assert conn.fetch_run(ds) == [] and store.calls["get"] == calls  # not even asked
    stats = conn.stats()
    assert (stats.errors, stats.timeouts, stats.breaker_rejections, stats.breaker_opens) == \
        (3, 3, 1, 1)
    assert "timed out" in stats.last_error
    clock.now += 5.0
    assert conn.breaker_state is BreakerState.half_open
    assert conn.fetch_run(ds) == [] and store.calls["get"] == calls + 1  # one trial: failed
    assert conn.breaker_state is BreakerState.open
    store.fail = None
    clock.now += 5.0
    assert same(conn.fetch_run(ds), bs)  # the trial succeeds: closed again
    assert conn.breaker_state is BreakerState.closed
    conn.close()


def test_writes_while_the_breaker_is_open_are_dropped_not_queued(store, ns):
    clock = Clock()
    conn = connector(store, ns, failure_threshold=1, cooldown_s=60, clock=clock)
    store.fail = StoreConnectionError("down")
    conn.fetch_run(digests(1))
    assert conn.breaker_state is BreakerState.open
    assert conn.offer(list(zip(digests(5), blocks(5)))) == 0
    assert conn.stats().dropped_writes == 5 and conn.stats().queue_blocks == 0
    conn.close()


def test_a_partial_failure_serves_what_came_back_and_does_not_trip_the_breaker(store, ns):
    ds, bs = digests(4), blocks(4)
    conn = connector(store, ns, failure_threshold=2)
    conn.offer(list(zip(ds, bs)))
    conn.flush(10)

    def half(keys):
        values = MemoryStore._get(store, keys)
        raise StorePartialError("node 2 down", results=values[:2] + [None] * (len(keys) - 2),
                                failed=keys[2:])

    store.get_override = half
    for _ in range(5):
        assert same(conn.fetch_run(ds), bs[:2])
    stats = conn.stats()
    assert stats.errors == 5 and stats.breaker_state is BreakerState.closed
    conn.close()


@pytest.mark.parametrize("answer", [lambda keys: [], lambda keys: None,
                                    lambda keys: [b"x"] * (len(keys) + 1),
                                    lambda keys: [123] * len(keys)])
def test_a_misbehaving_store_plugin_is_a_miss_never_a_crash(store, ns, answer):
    ds = digests(3)
    conn = connector(store, ns)
    conn.offer(list(zip(ds, blocks(3))))
    conn.flush(10)
    store.get_override = answer
    assert conn.fetch_run(ds) == []
    conn.close()


def test_a_store_raising_a_foreign_exception_is_a_counted_miss(store, ns):
    store.fail = RuntimeError("plugin bug")
    with connector(store, ns) as conn:
        assert conn.fetch_run(digests(2)) == []
        conn.offer(list(zip(digests(2), blocks(2))))
        conn.flush(10)
        stats = conn.stats()
    assert stats.errors == 2 and stats.dropped_writes == 2 and "plugin bug" in stats.last_error


# --- strict mode ---------------------------------------------------------------------------


def test_strict_mode_raises_instead_of_missing(store, ns):
    clock = Clock()
    conn = connector(store, ns, strict=True, failure_threshold=2, clock=clock)
    store.fail = StoreConnectionError("store memory://x: refused")
    for _ in range(2):
        with pytest.raises(StoreConnectionError, match="refused"):
            conn.fetch_run(digests(1))
    with pytest.raises(StoreUnavailableError, match="circuit open"):
        conn.fetch_run(digests(1))
    store.fail = RuntimeError("plugin bug")
    clock.now += 10
    with pytest.raises(StoreConnectionError, match="RuntimeError: plugin bug"):
        conn.fetch_run(digests(1))
    conn.close()


def test_strict_mode_raises_background_write_errors_on_the_next_call(store, ns):
    conn = connector(store, ns, strict=True)
    store.fail = StoreConnectionError("disk full")
    conn.offer(list(zip(digests(1), blocks(1))))
    with pytest.raises(StoreConnectionError, match="disk full"):
        conn.flush(10)
    conn.flush(10)  # raised once
    store.fail = StoreConnectionError("still full")
    conn.offer(list(zip(digests(2)[1:], blocks(1))))
    with pytest.raises(StoreConnectionError, match="still full"):
        conn.close()
    assert conn.stats().dropped_writes == 2


# --- bad input changes nothing -------------------------------------------------------------


@pytest.mark.parametrize("bad, error, fragment", [
    ((b"short", blocks(1)[0]), StoreKeyError, "16 bytes"),
    (("0" * 32, blocks(1)[0]), StoreKeyError, "16 bytes"),
    ((bytes(16), blocks(1)[0][:1]), ShapeMismatchError, "2 arrays (one per layer), got 1"),
    ((bytes(16), np.zeros((2, 2, 4, 2, 4), np.float16)), ShapeMismatchError, "got an array"),
    ((bytes(16), [np.zeros((2, 4, 2, 4), np.float32)] * 2), DtypeMismatchError, "float32"),
    ((bytes(16), [np.zeros((2, 4, 2, 5), np.float16)] * 2), ShapeMismatchError, "(2, 4, 2, 5)"),
    ((bytes(16), [[0.0]] * 2), DtypeMismatchError, "host numpy array, got list"),
    ((bytes(16),), StoreKeyError, "(chain_key, arrays) pairs"),
])
def test_a_bad_block_is_refused_and_nothing_of_its_batch_is_queued(store, ns, bad, error,
                                                                   fragment):
    with connector(store, ns) as conn:
        good = list(zip(digests(3), blocks(3)))
        with pytest.raises(error) as info:
            conn.offer(good + [bad])
        assert fragment in str(info.value)
        stats = conn.stats()
        assert (stats.blocks_offered, stats.queue_blocks, stats.dropped_writes) == (0, 0, 0)
        with pytest.raises(StoreKeyError):
            conn.fetch_run([bytes(16), b"x"])
        assert conn.stats().lookups == 0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"queue_blocks": 0}, "queue_blocks"), ({"batch_blocks": True}, "batch_blocks"),
    ({"queue_bytes": -1}, "queue_bytes"), ({"failure_threshold": 0}, "failure_threshold"),
    ({"cooldown_s": -1}, "cooldown_s"), ({"mac_key": b"short"}, "mac_key"),
    ({"key_size": 8}, "key_size"),
])
def test_bad_settings_are_refused(store, ns, kwargs, fragment):
    with pytest.raises(StoreConfigError, match=fragment):
        StoreConnector(store, ns, LAYOUT, **kwargs)


def test_bad_constructor_arguments_are_refused(store, ns):
    with pytest.raises(StoreConfigError, match="kvcore.stores.Store"):
        StoreConnector("memory://x", ns, LAYOUT)  # type: ignore[arg-type]
    with pytest.raises(StoreConfigError, match="StoreNamespace"):
        StoreConnector(store, b"x" * 16, LAYOUT)  # type: ignore[arg-type]
    with pytest.raises(StoreConfigError, match="layout"):
        StoreConnector(store, ns, [])


def test_open_closes_the_store_it_opened_when_the_settings_are_bad(tmp_path):
    with pytest.raises(StoreConfigError, match="queue_blocks"):
        StoreConnector.open(f"file://{tmp_path}/s", CFG, queue_blocks=0)
    with pytest.raises(StoreKeyError, match="namespace"):
        StoreConnector.open(f"file://{tmp_path}/s", CFG, namespace="bad name")


# --- lifetime and threads -------------------------------------------------------------------


def test_close_sends_what_is_queued_and_is_final(store, ns):
    conn = connector(store, ns)
    conn.offer(list(zip(digests(5), blocks(5))))
    conn.close()
    conn.close()
    assert len(store.get(ns.keys(digests(5)))) == 5 and None not in store.get(ns.keys(digests(5)))
    with pytest.raises(StoreClosedError):
        conn.offer(list(zip(digests(1), blocks(1))))
    with pytest.raises(StoreClosedError):
        conn.fetch_run(digests(1))
    assert not store.closed  # close_store=False: the caller's store stays open


def test_close_gives_up_on_a_stuck_store_after_its_timeout(store, ns):
    store.gate = threading.Event()
    conn = connector(store, ns, batch_blocks=1, skip_existing=False)
    conn.offer(list(zip(digests(3), blocks(3))))
    conn.close(timeout=0.2)
    assert conn.stats().dropped_writes >= 1  # what was still queued is counted
    store.gate.set()


def test_the_connector_closes_a_store_it_owns(ns):
    owned = MemoryStore(f"own-{uuid.uuid4().hex}")
    StoreConnector(owned, ns, LAYOUT).close()
    assert owned.closed


def test_many_threads_offering_and_fetching_at_once(store, ns):
    ds, bs = digests(64), blocks(64)
    problems: list[str] = []
    with connector(store, ns, queue_blocks=10000) as conn:
        def writer(part: int) -> None:
            for i in range(part, 64, 4):
                conn.offer([(ds[i], bs[i])])

        def reader() -> None:
            for _ in range(50):
                run = conn.fetch_run(ds)
                if not same(run, bs[:len(run)]):
                    problems.append("a fetched block differs from what was offered")

        threads = [threading.Thread(target=writer, args=(p,)) for p in range(4)]
        threads += [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert conn.flush(10)
        assert same(conn.fetch_run(ds), bs)
    assert problems == []


# --- long runs are read window by window --------------------------------------------------


def _window(n_blocks: int) -> int:
    """read_window (bytes) that holds exactly ``n_blocks`` values of LAYOUT."""
    from kvcore.stores._codec import BlockCodec
    return n_blocks * BlockCodec(bytes(16), LAYOUT).value_len


def test_a_long_run_is_read_in_windows_and_stops_at_the_first_miss(store, ns):
    ds, bs = digests(20), blocks(20)
    with connector(store, ns, read_window=_window(3)) as conn:
        conn.offer(list(zip(ds[:11], bs[:11])))
        conn.flush(10)
        before = store.calls["get"]
        run = conn.fetch_run(ds)
        assert same(run, bs[:11])
        # Windows of 3: 0-2, 3-5, 6-8, 9-11 hold the miss; at most one more prefetched.
        assert 4 <= store.calls["get"] - before <= 5
        assert conn.stats().hits == 11 and conn.stats().misses == 9


def test_a_window_that_fails_after_the_first_keeps_the_checked_run(store, ns):
    ds, bs = digests(12), blocks(12)
    conn = connector(store, ns, read_window=_window(4), failure_threshold=5)
    conn.offer(list(zip(ds, bs)))
    conn.flush(10)
    seen = []

    def fail_third_window(keys):
        seen.append(len(seen))
        if len(seen) == 3:
            raise StoreTimeoutError("store memory://x: GET timed out")
        return MemoryStore._get(store, keys)

    store.get_override = fail_third_window
    assert same(conn.fetch_run(ds), bs[:8])
    stats = conn.stats()
    assert (stats.errors, stats.timeouts, stats.hits, stats.misses) == (1, 1, 8, 4)
    conn.close()


def test_strict_mode_raises_for_a_later_window_too(store, ns):
    ds, bs = digests(6), blocks(6)
    conn = connector(store, ns, read_window=_window(2), strict=True)
    conn.offer(list(zip(ds, bs)))
    conn.flush(10)
    calls = []

    def fail_second_window(keys):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("plugin bug in window 2")
        return MemoryStore._get(store, keys)

    store.get_override = fail_second_window
    with pytest.raises(StoreConnectionError, match="plugin bug in window 2"):
        conn.fetch_run(ds)
    conn.close()


def test_a_damaged_value_in_a_later_window_ends_the_run_there(store, ns):
    ds, bs = digests(9), blocks(9)
    with connector(store, ns, read_window=_window(2)) as conn:
        conn.offer(list(zip(ds, bs)))
        conn.flush(10)
        store.put([(ns.key(ds[5]), b"KVCB" + bytes(100))])
        assert same(conn.fetch_run(ds), bs[:5])
        conn.flush(10)
        assert conn.stats().corrupt_values == 1 and store.get([ns.key(ds[5])]) == [None]


# --- offer_planes: a manager's batch form ------------------------------------------------


def _planes(bs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """K and V of each layer of ``bs`` as ``[n, ...]`` planes (what a gather gives)."""
    return [np.stack([b[layer][plane] for b in bs]) for layer in range(len(LAYOUT))
            for plane in (0, 1)]


def test_offer_planes_makes_the_values_offer_makes(store, ns):
    ds, bs = digests(5), blocks(5, seed=3)
    other = f"conn-{uuid.uuid4().hex}"
    twin = FaultyStore(other)
    try:
        with connector(store, ns) as a, connector(twin, ns) as b:
            assert a.offer(list(zip(ds, bs))) == 5
            assert b.offer_planes(ds, _planes(bs)) == 5
            assert a.flush(10) and b.flush(10)
            keys = ns.keys(ds)
            assert store.get(keys) == twin.get(keys)  # byte for byte
            assert same(b.fetch_run(ds), bs)
            assert b.offer_planes([], [p[:0] for p in _planes(bs)]) == 0
    finally:
        MemoryStore.drop(other)


@pytest.mark.parametrize("bad, error, fragment", [
    (lambda p: p[:-1], ShapeMismatchError, "4 arrays"),
    (lambda p: np.stack(p), ShapeMismatchError, "an array"),
    (lambda p: [p[0][:2], *p[1:]], ShapeMismatchError, "plane 0 has shape"),
    (lambda p: [p[0].astype(np.float32), *p[1:]], DtypeMismatchError, "float32"),
    (lambda p: [p[0].tolist(), *p[1:]], DtypeMismatchError, "list"),
])
def test_bad_planes_are_refused_and_nothing_is_queued(store, ns, bad, error, fragment):
    ds, bs = digests(3), blocks(3)
    with connector(store, ns) as conn:
        with pytest.raises(error, match=fragment):
            conn.offer_planes(ds, bad(_planes(bs)))
        with pytest.raises(StoreKeyError):
            conn.offer_planes([b"short", *ds[1:]], _planes(bs))
        assert conn.stats().blocks_offered == 0 and conn.flush(5)
        assert store.calls["put"] == 0


def test_offer_lazy_makes_blocks_on_the_writer_thread_and_drops_changed_ones(store, ns):
    ds, bs = digests(4), blocks(4, seed=9)
    threads: list[str] = []

    def produce():
        threads.append(threading.current_thread().name)
        return [bs[0], None, _planes(bs)[0:0] or [p[2] for p in _planes(bs)], None]

    with connector(store, ns) as conn:
        assert conn.offer_lazy(ds, 1000, produce) == 4
        assert conn.flush(10)
        assert threads == ["kvcore-store-writer"]  # once, and not on the caller's thread
        s = conn.stats()
        assert (s.blocks_written, s.blocks_changed, s.dropped_writes) == (2, 2, 2)
        assert same(conn.fetch_run(ds[:1]), bs[:1])  # block 0 as offer takes it
        assert store.get(ns.keys(ds[1:2])) == [None]
        assert same([conn._codec.decode(store.get(ns.keys(ds[2:3]))[0], ds[2])], bs[2:3])


def test_a_failing_or_lying_produce_drops_its_blocks_and_says_why(store, ns):
    ds = digests(3)
    with connector(store, ns) as conn:
        conn.offer_lazy(ds, 100, lambda: 1 / 0)
        conn.offer_lazy(ds, 100, lambda: [None])  # one answer for three blocks
        assert conn.flush(10)
        s = conn.stats()
        assert s.blocks_written == 0 and s.dropped_writes == 6 and s.blocks_changed == 0
        assert s.errors == 2 and "produce returned 1 blocks for 3" in s.last_error
        with pytest.raises(StoreConfigError, match="block_bytes"):
            conn.offer_lazy(ds, 0, lambda: [None] * 3)
        with pytest.raises(StoreConfigError, match="callable"):
            conn.offer_lazy(ds, 10, None)
        with pytest.raises(StoreKeyError):
            conn.offer_lazy([b"x"], 10, lambda: [None])
