"""The Redis store against real redis-server processes: URLs and options, AUTH, TLS,
TTL, two processes sharing a prompt, and faults (server stopped mid-run, a paused or
sleeping server, a full server) that are counted misses, never errors or wrong data."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvcore
from kvcore.errors import StoreConfigError, StoreConnectionError, StoreTimeoutError
from kvcore.stores import BreakerState, StoreConnector, block_layout, chain_keys, open_store
from tests.redis_fixtures import (AUTH_PASSWORD, fresh_redis, redis_auth_server,  # noqa: F401
                                  redis_server, require_redis, skip_or_fail)

ROOT = Path(__file__).resolve().parents[1]
HASH_KEY = b"redis-test-hash-key-0123456789ab"
CFG = kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                         block_size=4, num_blocks=16)


def blocks(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s.shape).astype(np.float16) for s in block_layout(CFG)]
            for _ in range(n)]


def digests(n: int, salt: str = "") -> list[bytes]:
    return chain_keys(None, np.arange(4 * n).reshape(n, 4), salt, HASH_KEY)


def same(run, sent) -> bool:
    return len(run) == len(sent) and all(a.tobytes() == b.tobytes()
                                         for r, s in zip(run, sent) for a, b in zip(r, s))


# --- URLs and options (no server needed) --------------------------------------------------


def parse(url: str, **options):
    from kv_redis._options import parse_redis_url
    return parse_redis_url(url, options)


def test_url_options_become_client_settings():
    require_redis()
    t = parse("redis://alice:p%40ss@cache.internal:6380/3?timeout=0.25&connect_timeout=1"
              "&ttl=3600&max_connections=8")
    assert (t.nodes, t.db, t.ttl, t.cluster, t.tls) == ([("cache.internal", 6380)], 3, 3600,
                                                         False, False)
    kw = t.client_kwargs
    assert (kw["username"], kw["password"], kw["socket_timeout"], kw["socket_connect_timeout"],
            kw["max_connections"], kw["db"]) == ("alice", "p@ss", 0.25, 1.0, 8, 3)
    assert "p@ss" not in t.redacted and "p%40ss" not in t.redacted
    # Keywords win over the URL (keep secrets out of URLs that get logged).
    assert parse("redis://:url@h/0", password="kw").client_kwargs["password"] == "kw"


def test_cluster_and_tls_url_forms():
    require_redis()
    t = parse("rediss+cluster://u:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002?ssl_ca_certs=/ca.pem"
              "&ssl_cert_reqs=optional&node_cooldown=5")
    assert t.cluster and t.tls and t.node_cooldown == 5.0
    assert t.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)]
    kw = t.client_kwargs
    assert (kw["ssl"], kw["ssl_ca_certs"], kw["ssl_cert_reqs"], kw["ssl_check_hostname"],
            kw["username"], kw["password"]) == (True, "/ca.pem", "optional", False, "u", "pw")
    assert "db" not in kw


@pytest.mark.parametrize("url, fragment", [
    ("redis://h:notaport/0", "port 'notaport' is not a number"),
    ("redis://h:70000/0", "bad host:port"),
    ("redis://h/x", "database 'x' is not a number"),
    ("redis://a:1,b:2/0", r"use redis\+cluster://"),
    ("redis+cluster://a:1/2", "only database 0"),
    ("redis://h/0?ssl_ca_certs=/x", "need TLS; use rediss://"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("redis://h/0?timeout=0", "timeout"),
    ("redis://h/0?ttl=-5", "ttl"),
    ("redis://h/0?bogus=1", "unknown option"),
    ("redis://h/0?timeout=1&timeout=2", "twice"),
    ("redis://,/0", "empty host"),
])
def test_bad_redis_urls_are_refused_naming_the_problem(url, fragment):
    require_redis()
    with pytest.raises(StoreConfigError, match=fragment):
        open_store(url)


def test_opening_contacts_nothing_and_hides_passwords():
    require_redis()
    # Nothing listens on port 1: opening still works; the first call fails, typed.
    store = open_store("redis://:hunter2@127.0.0.1:1/0?connect_timeout=0.2")
    assert "hunter2" not in store.url and "hunter2" not in repr(store)
    with pytest.raises(StoreConnectionError) as info:
        store.get(["k"])
    assert "hunter2" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    cluster = open_store("redis+cluster://:hunter2@127.0.0.1:1?connect_timeout=0.2")
    with pytest.raises(StoreConnectionError, match="cluster discovery failed"):
        cluster.get(["k"])
    store.close()
    cluster.close()


# --- against a server ---------------------------------------------------------------------


def test_auth_wrong_or_missing_password_is_a_typed_error(redis_auth_server):  # noqa: F811
    base = f"redis://127.0.0.1:{redis_auth_server.port}/0"
    for options in ({}, {"password": "wrong"}, {"username": "nobody", "password": AUTH_PASSWORD}):
        with open_store(base, **options) as store, pytest.raises(StoreConnectionError) as info:
            store.get(["k"])
        assert AUTH_PASSWORD not in str(info.value)
    with open_store(base, password=AUTH_PASSWORD) as store:
        store.put([("auth-ok", b"1")])
        assert store.get(["auth-ok"]) == [b"1"]
    with open_store(f"redis://default:{AUTH_PASSWORD}@127.0.0.1:{redis_auth_server.port}/0") \
            as store:
        assert store.get(["auth-ok"]) == [b"1"]


def test_tls_with_client_certificates(tmp_path):
    require_redis()
    from kv_redis.testing import RedisServer, make_tls_files
    try:
        server = RedisServer(tmp_path / "tls", tls=True).start()
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        return
    try:
        with StoreConnector.open(server.url, CFG) as conn:
            conn.offer(list(zip(digests(3), blocks(3))))
            assert conn.flush(10)
            assert same(conn.fetch_run(digests(3)), blocks(3))
        other = make_tls_files(tmp_path / "other-ca", name="impostor")
        t = server.tls
        for url in (server.url.replace(str(t.ca), str(other.ca)),  # server not trusted
                    f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={t.ca}",  # no client cert
                    f"redis://127.0.0.1:{server.port}/0"):  # plain text to a TLS port
            with open_store(url) as store, pytest.raises(StoreConnectionError):
                store.get(["k"])
    finally:
        server.stop()


def test_reads_in_small_windows_return_every_value_in_order(redis_server):  # noqa: F811
    keys = [f"win.{i}" for i in range(25)]
    with open_store(redis_server.url + "?read_window=1") as store:
        store.put([(k, k.encode() * (i + 1)) for i, k in enumerate(keys)])
        assert store.get(keys + ["win.none"]) == [k.encode() * (i + 1)
                                                  for i, k in enumerate(keys)] + [None]
        assert store.accepts_parts  # this redis-py takes the zero-copy packer
        store.delete(keys)


def test_ttl_expires_values(redis_server):  # noqa: F811
    with open_store(redis_server.url + "?ttl=100") as store:
        store.put([("ttl-key", b"v")])
        import redis
        ttl = redis.Redis(port=redis_server.port).ttl("ttl-key")
        assert 0 < ttl <= 100


def test_two_processes_share_a_prompt_bit_identically(redis_server):  # noqa: F811
    key = HASH_KEY.hex()
    run = [sys.executable, "-m", "tests.store_peer"]
    wrote = subprocess.run(run + ["write", redis_server.url, key], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert wrote.returncode == 0, wrote.stderr
    assert json.loads(wrote.stdout) == {"role": "write", "drained": True, "written": 12,
                                        "blocks": 12}
    read = subprocess.run(run + ["read", redis_server.url, key], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    result = json.loads(read.stdout)
    assert result == {"role": "read", "hits": 12, "blocks": 12, "hit_rate": 1.0,
                      "bit_identical": True, "errors": 0}
    # A process without the shared hash_key finds nothing: keys are keyed.
    stranger = subprocess.run(run + ["read", redis_server.url, (b"x" * 32).hex()], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert json.loads(stranger.stdout)["hits"] == 0


def test_an_acl_confines_a_deployment_to_its_namespace(fresh_redis):  # noqa: F811
    import redis
    redis.Redis(port=fresh_redis.port).execute_command(
        "ACL", "SETUSER", "prod-eu", "on", ">pw-eu", "~kvc1.prod-eu.*",
        "+get", "+mget", "+set", "+exists", "+del", "+ping")
    ds, bs = digests(4), blocks(4)
    creds = {"username": "prod-eu", "password": "pw-eu"}
    with StoreConnector.open(fresh_redis.url, CFG, namespace="prod-eu",
                             store_options=creds) as own:
        own.offer(list(zip(ds, bs)))
        own.flush(10)
        assert same(own.fetch_run(ds), bs) and own.stats().errors == 0
    with StoreConnector.open(fresh_redis.url, CFG, namespace="prod-us",
                             store_options=creds) as other:
        other.offer(list(zip(ds, bs)))
        other.flush(10)
        assert other.fetch_run(ds) == []
        assert other.stats().errors == 2 and "NoPermissionError" in other.stats().last_error


def test_no_token_id_appears_in_any_key(redis_server):  # noqa: F811
    import redis
    tokens = np.array([[123456, 7, 42, 99999]])
    with StoreConnector.open(redis_server.url, CFG, namespace="tokens-check") as conn:
        conn.offer([(chain_keys(None, tokens, None, HASH_KEY)[0], blocks(1)[0])])
        conn.flush(10)
    keys = [k.decode() for k in redis.Redis(port=redis_server.port).keys("kvc1.tokens-check.*")]
    assert len(keys) == 1
    assert not any(str(t) in keys[0].split(".")[-1] for t in (123456, 99999))
    assert len(keys[0].split(".")[-1]) == 32  # only the 128-bit keyed digest


# --- faults -------------------------------------------------------------------------------


def test_server_stopped_mid_run_then_restarted(fresh_redis):  # noqa: F811
    ds, bs = digests(6), blocks(6)
    conn = StoreConnector.open(fresh_redis.url + "?timeout=0.3&connect_timeout=0.3", CFG,
                               failure_threshold=2, cooldown_s=0.5)
    conn.offer(list(zip(ds, bs)))
    assert conn.flush(10)
    assert same(conn.fetch_run(ds), bs)
    fresh_redis.stop()  # down mid-run
    for _ in range(5):
        assert conn.fetch_run(ds) == []  # misses, not exceptions
    assert conn.offer(list(zip(digests(3, "late"), blocks(3)))) <= 3  # never waits
    stats = conn.stats()
    assert stats.errors >= 2 and stats.breaker_opens >= 1 and stats.breaker_rejections >= 1
    assert conn.breaker_state is not BreakerState.closed
    fresh_redis.start()  # same port, empty (nothing persisted)
    time.sleep(0.6)  # the cool-down
    assert conn.fetch_run(ds) == []  # the trial succeeds: an empty server, misses
    assert conn.breaker_state is BreakerState.closed
    conn.offer(list(zip(ds, bs)))
    assert conn.flush(10)
    assert same(conn.fetch_run(ds), bs)
    conn.close()


def test_a_paused_server_costs_a_timeout_then_the_breaker_not_a_hang(fresh_redis):  # noqa: F811
    ds, bs = digests(4), blocks(4)
    conn = StoreConnector.open(fresh_redis.url + "?timeout=0.2&connect_timeout=0.2", CFG,
                               failure_threshold=2, cooldown_s=60)
    conn.offer(list(zip(ds, bs)))
    conn.flush(10)
    fresh_redis.pause()  # SIGSTOP: the socket accepts, nothing answers
    try:
        for _ in range(4):
            assert conn.fetch_run(ds) == []
        stats = conn.stats()
        assert stats.timeouts == 2 and stats.breaker_rejections == 2
        assert conn.breaker_state is BreakerState.open
        accepted = conn.offer(list(zip(ds, bs)))  # dropped at once: the breaker is open
        assert accepted == 0 and conn.stats().dropped_writes == 4
    finally:
        fresh_redis.resume()
    with open_store(fresh_redis.url) as direct:
        assert len([v for v in direct.get(conn.namespace.keys(ds)) if v]) == 4
    conn.close()


def test_a_sleeping_server_times_out_typed(fresh_redis):  # noqa: F811
    import redis
    blocker = threading.Thread(target=lambda: redis.Redis(port=fresh_redis.port).execute_command(
        "DEBUG", "SLEEP", "1.5"))
    blocker.start()
    time.sleep(0.2)
    with open_store(fresh_redis.url + "?timeout=0.2") as store:
        with pytest.raises(StoreTimeoutError, match="timed out"):
            store.get(["k"])
    blocker.join()


def test_a_full_server_drops_writes_counted_and_reads_still_work(fresh_redis):  # noqa: F811
    import redis
    admin = redis.Redis(port=fresh_redis.port)
    ds, bs = digests(3), blocks(3)
    with StoreConnector.open(fresh_redis.url, CFG, failure_threshold=100) as conn:
        conn.offer(list(zip(ds, bs)))
        conn.flush(10)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", admin.info("memory")["used_memory"])  # full now
        conn.offer(list(zip(digests(20, "more"), blocks(20))))
        conn.flush(10)
        stats = conn.stats()
        assert stats.dropped_writes == 20 and "OutOfMemoryError" in stats.last_error
        assert "maxmemory" in stats.last_error and "KVCB" not in stats.last_error
        assert same(conn.fetch_run(ds), bs)  # reads are unaffected
