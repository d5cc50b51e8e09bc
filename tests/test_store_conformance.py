"""The store section of the conformance suite, run against every store kvcore ships
(memory, a directory, a real redis-server with AUTH, a real three-master Redis
Cluster), through ``--kv-store`` as a third party would, and against a deliberately
broken store, which must fail on the clause it breaks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvcore.stores import MemoryStore, register_store, unregister_store
from kvcore_conformance.stores import STORE_CLAUSES, StoreContract
from tests.redis_fixtures import AUTH_PASSWORD, redis_auth_server, redis_cluster  # noqa: F401

pytest_plugins = ["pytester"]
CLAUSE = re.compile(r"contract clause \[([^\]]+)\] broken")


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def kvcore_store_url(self) -> str:
        return "memory://conformance"


class TestDiskStore(StoreContract):
    @pytest.fixture
    def kvcore_store_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/store"


class TestRedisStoreWithAuth(StoreContract):
    @pytest.fixture
    def kvcore_store_url(self, redis_auth_server) -> str:  # noqa: F811
        return f"redis://127.0.0.1:{redis_auth_server.port}/0"

    @pytest.fixture
    def kvcore_store_options(self) -> dict[str, str]:
        return {"password": AUTH_PASSWORD}


class TestRedisCluster(StoreContract):
    @pytest.fixture
    def kvcore_store_url(self, redis_cluster) -> str:  # noqa: F811
        return redis_cluster.url


# --- a third party's view: --kv-store, and teeth ------------------------------------------


class _TruncatingStore(MemoryStore):
    """Loses the last byte of every value over 1 MiB (a broken chunked upload)."""

    name = "truncating"
    schemes = ("truncating",)

    def _put(self, items):
        super()._put([(k, bytes(v)[:-1] if len(v) > 1 << 20 else v) for k, v in items])


class _ReorderingStore(MemoryStore):
    """Answers a batch sorted by key instead of in the order asked."""

    name = "reordering"
    schemes = ("reordering",)

    def _get(self, keys):
        by_key = dict(zip(keys, super()._get(keys)))
        return [by_key[k] for k in sorted(keys)]


@pytest.fixture
def broken_stores():
    for cls in (_TruncatingStore, _ReorderingStore):
        register_store(cls, replace_existing=True)
    yield
    for cls in (_TruncatingStore, _ReorderingStore):
        unregister_store(cls.name)


def _reports(reprec):
    reports = reprec.getreports("pytest_runtest_logreport")
    failed = {r.nodeid: r.longreprtext for r in reports if r.failed}
    passed = {r.nodeid for r in reports if r.passed and r.when == "call"}
    return failed, passed


def test_kv_store_option_runs_the_section_against_a_url(pytester, tmp_path):
    reprec = pytester.inline_run("-p", "no:cacheprovider", "--pyargs",
                                 "kvcore_conformance.stores", "--kv-store",
                                 f"file://{tmp_path}/third-party")
    failed, passed = _reports(reprec)
    assert reprec.ret == 0 and not failed
    assert len(passed) == len(STORE_CLAUSES)  # one test per clause, all ran


@pytest.mark.parametrize("url, clause, test", [
    ("truncating://x", "store.binary-safe", "test_values_of_any_bytes_round_trip"),
    ("reordering://x", "store.round-trip", "test_put_then_get_returns_each_value_in_order"),
])
def test_a_broken_store_fails_on_the_clause_it_breaks(pytester, broken_stores, url, clause,
                                                      test):
    reprec = pytester.inline_run("-p", "no:cacheprovider", "--pyargs",
                                 "kvcore_conformance.stores", "--kv-store", url)
    failed, passed = _reports(reprec)
    assert reprec.ret == pytest.ExitCode.TESTS_FAILED
    hits = [text for nodeid, text in failed.items() if f"::{test}[" in nodeid]
    assert hits and f"contract clause [{clause}] broken" in hits[0]
    for text in failed.values():  # every failure names a clause
        assert CLAUSE.search(text), text[-1500:]
    assert any("test_delete_removes_and_counts" in n for n in passed)  # precise, not smeared


def test_the_store_plugin_imports_nothing_heavy():
    import subprocess
    import sys
    code = ("import sys, kvcore_conformance.stores.plugin\n"
            "print(','.join(m for m in ('numpy', 'kvcore', 'kvcore_conformance.stores.contract')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_without_kv_store_the_section_collects_nothing(pytester):
    reprec = pytester.inline_run("-p", "no:cacheprovider", "--pyargs", "kvcore_conformance")
    failed, passed = _reports(reprec)
    assert not any("stores" in nodeid for nodeid in set(failed) | passed)
    reprec = pytester.inline_run("-p", "no:cacheprovider", "--pyargs",
                                 "kvcore_conformance.stores")
    assert reprec.ret == pytest.ExitCode.NO_TESTS_COLLECTED
