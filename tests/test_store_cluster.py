"""The Redis Cluster store against a real three-master cluster: batches that cross
slots and masters, and a master killed during a run (the run completes, that master's
keys miss, nothing wrong is served, the other masters keep serving)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kvcore
from kvcore.errors import StorePartialError
from kvcore.stores import BreakerState, StoreConnector, block_layout, chain_keys, open_store
from tests.redis_fixtures import fresh_cluster, redis_cluster  # noqa: F401

HASH_KEY = b"cluster-test-hash-key-0123456789"
CFG = kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                         block_size=4, num_blocks=16)


def digests(n: int, salt: str = "") -> list[bytes]:
    return chain_keys(None, np.arange(4 * n).reshape(n, 4), salt, HASH_KEY)


def block(i: int) -> list[np.ndarray]:
    rng = np.random.default_rng(i)
    return [rng.standard_normal(s.shape).astype(np.float16) for s in block_layout(CFG)]


def test_a_batch_spreads_over_every_master_and_round_trips(redis_cluster):  # noqa: F811
    ds = digests(300)
    with StoreConnector.open(redis_cluster.url, CFG) as conn:
        keys = conn.namespace.keys(ds)
        client = conn.store.client
        masters = {client.get_node_from_key(k).name for k in keys}
        assert len(masters) == 3  # the batch crosses slots and masters
        conn.offer([(d, block(i)) for i, d in enumerate(ds)])
        assert conn.flush(30)
        run = conn.fetch_run(ds)
        assert len(run) == 300
        assert all(a.tobytes() == b.tobytes() for i, got in enumerate(run)
                   for a, b in zip(got, block(i)))
        assert conn.store.exists(keys) == [True] * 300
        assert conn.store.delete(keys) == 300


def test_a_master_killed_during_a_run(fresh_cluster):  # noqa: F811
    url = fresh_cluster.url + "?timeout=0.3&connect_timeout=0.3&node_cooldown=0.5"
    ds = digests(120)
    conn = StoreConnector.open(url, CFG, failure_threshold=3, cooldown_s=0.5)
    client = conn.store.client
    keys = conn.namespace.keys(ds)
    victim = fresh_cluster.nodes[1]
    on_victim = [client.get_node_from_key(k).port == victim.port for k in keys]
    assert 10 < sum(on_victim) < 110

    problems: list[str] = []
    served = [0]
    stop = threading.Event()

    def engine() -> None:
        """Offers blocks as they 'complete' and keeps reading the prompt back."""
        i = 0
        while not stop.is_set():
            try:
                conn.offer([(ds[i % 120], block(i % 120))])
                for j, got in enumerate(conn.fetch_run(ds)):
                    if any(a.tobytes() != b.tobytes() for a, b in zip(got, block(j))):
                        problems.append(f"block {j} served with wrong bytes")
                    served[0] += 1
            except Exception as exc:  # noqa: BLE001 - the run must not see any
                problems.append(f"{type(exc).__name__}: {exc}")
            i += 1

    workers = [threading.Thread(target=engine) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    victim.kill()  # SIGKILL mid-run
    time.sleep(1.5)
    fresh_cluster.wait_node_failed(victim)
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(30)
    assert not any(w.is_alive() for w in workers)
    assert problems == [] and served[0] > 0

    # After the kill: every block lives where it lived; the victim's keys miss, the
    # rest are served, bit for bit, and nothing raises past the connector.
    conn.offer([(d, block(i)) for i, d in enumerate(ds)])
    conn.flush(30)
    with pytest.raises(StorePartialError) as info:
        conn.store.get(keys)
    values = info.value.results
    for k, v, dead in zip(keys, values, on_victim):
        assert (v is None) == dead, k
    assert sorted(info.value.failed) == sorted(k for k, d in zip(keys, on_victim) if d)
    first_dead = on_victim.index(True)
    run = conn.fetch_run(ds)
    assert len(run) == first_dead
    assert all(a.tobytes() == b.tobytes() for i, got in enumerate(run)
               for a, b in zip(got, block(i)))
    live = [d for d, dead in zip(ds, on_victim) if not dead]
    stats = conn.stats()
    assert stats.errors > 0 and stats.corrupt_values == 0
    assert conn.breaker_state is BreakerState.closed  # two masters still serve
    conn.close()
    # A new client (another process) reads every block of the surviving masters.
    with open_store(url) as other:
        values = other.get([k for k, dead in zip(keys, on_victim) if not dead])
    assert all(v is not None for v in values) and len(values) == len(live)
