"""StoreContract: the tests every kvcore store must pass.

Subclass it in a ``test_*.py`` (class name ``Test*``) and provide the URL::

    import pytest
    from kvcore_conformance.stores import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def kvcore_store_url(self):
            return "s3://my-bucket/kvcore-test"

or run ``pytest --pyargs kvcore_conformance.stores --kv-store URL``.  The tests write
only keys of their own (``kvct.<random>.<n>``) and delete them afterwards, so a
shared server is fine.  ``kvcore_store_options`` (default ``{}``) is passed to
``open_store`` (passwords, timeouts).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from . import _clauses as c
from ._clauses import check, covers, expect_raises

__all__ = ["StoreContract"]


class _Keys:
    """Unique keys for one test, deleted at its end."""

    def __init__(self) -> None:
        self.prefix = f"kvct.{uuid.uuid4().hex[:16]}."
        self.made: list[str] = []

    def __call__(self, n: int) -> list[str]:
        start = len(self.made)
        keys = [f"{self.prefix}{start + i}" for i in range(n)]
        self.made += keys
        return keys


class StoreContract:
    """The store contract (clause ids in ``kvcore_conformance.stores._clauses``)."""

    # --- fixtures (override kvcore_store_url / kvcore_store_options) ----------------

    @pytest.fixture
    def kvcore_store_options(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        """Keyword options for ``open_store`` (secrets, timeouts): ``--kv-store-option``
        values, else none."""
        from .plugin import store_options
        return store_options(request.config)

    @pytest.fixture
    def kvcore_store_opener(self, kvcore_store_url: str,
                            kvcore_store_options: dict[str, Any]) -> Iterator[Callable[[], Any]]:
        """Opens another store on the same URL (closed after the test)."""
        from kvcore.stores import open_store
        opened: list[Any] = []

        def open_one() -> Any:
            store = open_store(kvcore_store_url, **kvcore_store_options)
            opened.append(store)
            return store

        yield open_one
        for store in opened:
            store.close()

    @pytest.fixture
    def kvcore_store(self, kvcore_store_opener: Callable[[], Any]) -> Any:
        """The store under test."""
        return kvcore_store_opener()

    @pytest.fixture
    def keys(self, kvcore_store_opener: Callable[[], Any]) -> Iterator[_Keys]:
        made = _Keys()
        yield made
        if made.made:
            cleaner = kvcore_store_opener()
            try:
                cleaner.delete(made.made)
            except Exception:  # noqa: BLE001 - best effort; a failing store failed already
                pass

    # --- the clauses ------------------------------------------------------------------

    @covers(c.IDENTITY)
    def test_store_class_declares_its_identity(self, kvcore_store, kvcore_store_url):
        from kvcore.stores import STORE_API_VERSION, Store, url_scheme
        cls = type(kvcore_store)
        check(isinstance(kvcore_store, Store), c.IDENTITY, "open_store must return a Store",
              seen=cls.__mro__)
        check(isinstance(cls.name, str) and bool(cls.name), c.IDENTITY, "Store.name",
              seen=cls.name)
        check(url_scheme(kvcore_store_url) in cls.schemes, c.IDENTITY,
              "Store.schemes must include the scheme of the URL it opened",
              seen=cls.schemes, expected=url_scheme(kvcore_store_url))
        check(cls.api_version == STORE_API_VERSION, c.IDENTITY, "Store.api_version",
              seen=cls.api_version, expected=STORE_API_VERSION)

    @covers(c.ROUND_TRIP)
    def test_put_then_get_returns_each_value_in_order(self, kvcore_store, keys):
        ks = keys(10)
        values = [os.urandom(17 * (i + 1)) for i in range(10)]
        kvcore_store.put(list(zip(ks, values)))
        (missing,) = keys(1)
        asked = [ks[3], missing, *reversed(ks)]
        got = kvcore_store.get(asked)
        expected = [values[3], None, *reversed(values)]
        check(got == expected, c.ROUND_TRIP, "get(keys) after put",
              seen=[None if v is None else len(v) for v in got],
              expected=[None if v is None else len(v) for v in expected])

    @covers(c.BINARY)
    def test_values_of_any_bytes_round_trip(self, kvcore_store, keys):
        from kvcore.stores import ValueParts
        big = os.urandom(4 << 20)
        parts = ValueParts([memoryview(b"head\r\n"), memoryview(b""),
                            memoryview(np.arange(1000, dtype=np.float32).view(np.uint8)),
                            memoryview(os.urandom(70000))])
        values: list[Any] = [bytes(range(256)), b"", b"\x00" * 5, big,
                             bytearray(b"\xff\x00\r\n$*"), memoryview(b"view\x00me"), parts]
        ks = keys(len(values))
        kvcore_store.put(list(zip(ks, values)))
        got = kvcore_store.get(ks)
        for key, sent, back in zip(ks, values, got):
            check(isinstance(back, bytes), c.BINARY, f"{key}: a value reads back as bytes",
                  seen=type(back).__name__, expected="bytes")
            want = sent.tobytes() if isinstance(sent, ValueParts) else bytes(sent)
            check(back == want, c.BINARY, f"{key}: value changed on the way",
                  seen=len(back) if back is not None else None, expected=len(want))

    @covers(c.OVERWRITE)
    def test_a_rewritten_key_holds_the_later_value(self, kvcore_store, keys):
        (k,) = keys(1)
        kvcore_store.put([(k, b"first")])
        kvcore_store.put([(k, b"second")])
        check(kvcore_store.get([k]) == [b"second"], c.OVERWRITE, "after two puts",
              seen=kvcore_store.get([k]), expected=[b"second"])
        kvcore_store.put([(k, b"third"), (k, b"fourth")])
        check(kvcore_store.get([k]) == [b"fourth"], c.OVERWRITE,
              "a key given twice in one batch", seen=kvcore_store.get([k]),
              expected=[b"fourth"])

    @covers(c.EXISTS)
    def test_exists_answers_per_key_in_order(self, kvcore_store, keys):
        ks = keys(6)
        kvcore_store.put([(k, b"x") for k in ks[::2]])
        got = kvcore_store.exists(ks)
        check(got == [True, False, True, False, True, False], c.EXISTS, "exists(keys)",
              seen=got, expected=[True, False, True, False, True, False])

    @covers(c.DELETE)
    def test_delete_removes_and_counts(self, kvcore_store, keys):
        ks = keys(5)
        kvcore_store.put([(k, b"v") for k in ks[:3]])
        removed = kvcore_store.delete(ks[1:])
        check(removed == 2, c.DELETE, "delete of 2 present and 2 absent keys returns 2",
              seen=removed, expected=2)
        got = kvcore_store.get(ks[:3])
        check(got == [b"v", None, None], c.DELETE, "values after delete", seen=got,
              expected=[b"v", None, None])
        check(kvcore_store.delete(ks[1:]) == 0, c.DELETE, "deleting again removes nothing")

    @covers(c.BATCH)
    def test_batches_empty_large_and_repeated(self, kvcore_store, keys):
        check(kvcore_store.put([]) is None, c.BATCH, "put([])")
        check(kvcore_store.get([]) == [], c.BATCH, "get([])", seen=kvcore_store.get([]))
        check(kvcore_store.exists([]) == [], c.BATCH, "exists([])")
        check(kvcore_store.delete([]) == 0, c.BATCH, "delete([])")
        ks = keys(1000)
        kvcore_store.put([(k, k.encode()) for k in ks])
        got = kvcore_store.get(ks)
        wrong = [k for k, v in zip(ks, got) if v != k.encode()]
        check(not wrong, c.BATCH, "a batch of 1,000 keys", seen=wrong[:5], expected=[])
        twice = kvcore_store.get([ks[0], ks[0]])
        check(twice == [ks[0].encode()] * 2, c.BATCH, "a key asked twice", seen=twice)

    @covers(c.KEYS)
    def test_bad_keys_are_refused_before_anything_is_written(self, kvcore_store, keys):
        from kvcore.errors import StoreKeyError
        (good,) = keys(1)
        for bad in ("has space", "a/b", "x" * 201, "", "ключ", "a:b"):
            expect_raises(c.KEYS, StoreKeyError, lambda bad=bad: kvcore_store.put(
                [(good, b"v"), (bad, b"v")]), f"put with key {bad!r}")
            expect_raises(c.KEYS, StoreKeyError, lambda bad=bad: kvcore_store.get([bad]),
                          f"get with key {bad!r}")
        expect_raises(c.KEYS, StoreKeyError, lambda: kvcore_store.get(good),
                      "get with a single str instead of a sequence")
        expect_raises(c.KEYS, StoreKeyError, lambda: kvcore_store.put([(good, "text")]),
                      "put of a str value")
        check(kvcore_store.get([good]) == [None], c.KEYS,
              "a refused batch wrote nothing", seen=kvcore_store.get([good]))

    @covers(c.SHARED)
    def test_a_second_store_on_the_same_url_shares_the_data(self, kvcore_store,
                                                            kvcore_store_opener, keys):
        other = kvcore_store_opener()
        ks = keys(3)
        kvcore_store.put([(k, k.encode()) for k in ks])
        check(other.get(ks) == [k.encode() for k in ks], c.SHARED, "writes seen by another "
              "store", seen=other.get(ks))
        other.delete(ks[:1])
        check(kvcore_store.get(ks[:1]) == [None], c.SHARED, "deletes seen by another store")

    @covers(c.THREADS)
    def test_eight_threads_at_once_lose_and_mix_nothing(self, kvcore_store, keys):
        per_thread = [keys(40) for _ in range(8)]
        shared = keys(4)
        kvcore_store.put([(k, k.encode() * 100) for k in shared])
        problems: list[str] = []
        start = threading.Barrier(8)

        def work(ks: list[str]) -> None:
            try:
                start.wait()
                for round_ in range(3):
                    values = [f"{k}:{round_}".encode() * 50 for k in ks]
                    kvcore_store.put(list(zip(ks, values)))
                    if kvcore_store.get(ks) != values:
                        problems.append(f"{ks[0]}: own values changed in round {round_}")
                    if kvcore_store.get(shared) != [k.encode() * 100 for k in shared]:
                        problems.append(f"{ks[0]}: shared values changed")
            except Exception as exc:  # noqa: BLE001 - reported below
                problems.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(ks,)) for ks in per_thread]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        check(not problems, c.THREADS, "8 threads writing and reading", seen=problems[:5],
              expected=[])

    @covers(c.CLOSED)
    def test_close_is_idempotent_and_final(self, kvcore_store_opener, keys):
        from kvcore.errors import StoreClosedError
        store = kvcore_store_opener()
        (k,) = keys(1)
        store.put([(k, b"v")])
        store.close()
        store.close()
        check(store.closed, c.CLOSED, "closed is True after close()")
        for name, call in (("get", lambda: store.get([k])), ("put", lambda: store.put([(k, b"")])),
                           ("exists", lambda: store.exists([k])),
                           ("delete", lambda: store.delete([k]))):
            expect_raises(c.CLOSED, StoreClosedError, call, f"{name} after close")
        with kvcore_store_opener() as other:
            pass
        check(other.closed, c.CLOSED, "leaving a with block closes the store")

    @covers(c.SECRETS)
    def test_url_and_repr_hide_the_password(self, kvcore_store_url, kvcore_store_options):
        from kvcore.errors import StoreConfigError
        from kvcore.stores import open_store
        secret = "s3cret-" + uuid.uuid4().hex[:8]
        scheme, _, rest = kvcore_store_url.partition("://")
        attempts = [(kvcore_store_url, {**kvcore_store_options, "password": secret}),
                    (f"{scheme}://user:{secret}@{rest.split('@')[-1]}", kvcore_store_options)]
        for url, options in attempts:
            try:
                store = open_store(url, **options)
            except StoreConfigError:
                continue  # this store takes no password in that form
            try:
                for shown in (store.url, repr(store)):
                    check(secret not in shown, c.SECRETS, "the password is shown",
                          seen=shown, expected="no password")
            finally:
                store.close()

    @covers(c.CONNECTOR)
    def test_blocks_through_a_connector_come_back_bit_identical(self, kvcore_store, keys):
        import kvcore
        from kvcore.stores import StoreConnector, StoreNamespace, block_layout, chain_keys
        config = kvcore.CacheConfig(num_layers=3, num_kv_heads=2, head_dim=8,
                                    dtype="float16", block_size=4, num_blocks=16)
        ns = StoreNamespace.from_config(config, namespace=f"kvct-{uuid.uuid4().hex[:12]}")
        rng = np.random.default_rng(7)
        tokens = rng.integers(0, 50000, (8, 4))
        digests = chain_keys(None, tokens, None, b"conformance-hash-key-0123456789ab")
        keys.made.extend(ns.keys(digests))  # cleaned up with the test's keys
        layout = block_layout(config)
        blocks = [[rng.integers(0, 2**16, s.shape, dtype=np.uint16).view(np.float16)
                   for s in layout] for _ in range(6)]
        with StoreConnector(kvcore_store, ns, layout, close_store=False) as conn:
            conn.offer(list(zip(digests[:6], blocks)))
            check(conn.flush(30), c.CONNECTOR, "flush drains the write-behind queue")
            run = conn.fetch_run(digests)
            check(len(run) == 6, c.CONNECTOR, "leading run of 6 written blocks out of 8 asked",
                  seen=len(run), expected=6)
            for i, (sent, back) in enumerate(zip(blocks, run)):
                same = all(a.tobytes() == b.tobytes() and a.shape == b.shape
                           for a, b in zip(sent, back))
                check(same, c.CONNECTOR, f"block {i} read back bit for bit")
            kvcore_store.put([(ns.key(digests[2]), b"KVCB garbage")])
            run = conn.fetch_run(digests)
            check(len(run) == 2, c.CONNECTOR, "a damaged value ends the run",
                  seen=len(run), expected=2)
            conn.flush(30)
            stats = conn.stats()
            check(stats.corrupt_values == 1 and stats.errors == 0, c.CONNECTOR,
                  "the damaged value is counted", seen=stats.model_dump())
            check(kvcore_store.exists([ns.key(digests[2])]) == [False], c.CONNECTOR,
                  "the damaged value is deleted from the store")
