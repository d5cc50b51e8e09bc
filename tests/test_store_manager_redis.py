"""A manager with a store, against real ``redis-server`` processes and across processes:
``kvcore demo --store`` (a second process reads back, bit-identical, what the first
wrote; Redis and the disk store), the server killed or frozen during a run (the cache
keeps working locally, errors counted; strict mode raises), and a Redis Cluster
master killed during a run (the run completes, nothing wrong is served)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvcore import AllocationRequest, KvCacheManager
from kvcore.errors import StoreConnectionError
from tests.redis_fixtures import fresh_cluster, fresh_redis, redis_server  # noqa: F401
from tests.test_store_manager import assert_holds, cfg, prefill, prompt

ROOT = Path(__file__).resolve().parent.parent
FAST = "timeout=0.3&connect_timeout=0.3"


def _demo(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvcore", "demo", "--store", url], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_demo_two_processes_share_a_prompt_through_redis(redis_server):  # noqa: F811
    import redis
    out = _demo(redis_server.url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"process 2 \(pid \d+\): allocated the same prompt; 992 of 1000 tokens "
                     r"served from the store \(62 blocks, hit rate 100%", out.stdout), out.stdout
    assert "bit-identical to what process 1 wrote; store errors 0" in out.stdout
    # The demo cleans up: its keys (a fresh hash_key: nobody could find them) are gone.
    assert list(redis.Redis(port=redis_server.port).scan_iter(match="kvc1.kvcore-demo.*")) == []


def test_demo_two_processes_share_a_prompt_through_the_disk_store(tmp_path):
    out = _demo(f"file://{tmp_path}/kv")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "992 of 1000 tokens served from the store" in out.stdout
    assert "bit-identical" in out.stdout


def test_a_server_killed_during_a_run_costs_hits_not_the_run(fresh_redis):  # noqa: F811
    url = f"{fresh_redis.url}?{FAST}"
    options = {"failure_threshold": 2, "cooldown_s": 0.5}
    with KvCacheManager(cfg(url, store_options=options), backend="numpy") as a:
        prefill(a, "w", prompt(1, 22))
    b = KvCacheManager(cfg(url, store_options=options), backend="numpy")
    assert prefill(b, "r0", prompt(1, 22)).num_cached_tokens() == 20
    fresh_redis.kill()
    began = time.monotonic()
    for i in range(6):  # new prompts (store lookups, offers) and the cached one
        r = prefill(b, f"n{i}", prompt(400 + i, 22))
        assert r.num_cached_tokens() == 0
        assert_holds(b, r, prompt(400 + i, 22))
        again = prefill(b, f"c{i}", prompt(1, 22))
        assert again.num_cached_tokens() == 20  # local prefix hits go on
        assert_holds(b, again, prompt(1, 22))
    assert time.monotonic() - began < 10  # short timeouts, then the breaker
    b.flush_store(5)
    s = b.stats()
    assert s.store_errors >= 2 and s.store_hits == 5 and s.store_dropped_writes > 0
    b.check_invariants()
    b.close()


def test_a_frozen_server_times_out_and_strict_mode_raises(fresh_redis):  # noqa: F811
    url = f"{fresh_redis.url}?{FAST}"
    with KvCacheManager(cfg(url), backend="numpy") as a:
        prefill(a, "w", prompt(1, 22))
    strict = KvCacheManager(cfg(url, store_options={"strict": True}), backend="numpy")
    lenient = KvCacheManager(cfg(url), backend="numpy")
    fresh_redis.pause()  # accepts connections, never answers
    try:
        with pytest.raises(StoreConnectionError):
            strict.allocate(AllocationRequest(request_id="s", prompt_token_ids=prompt(1, 22)))
        assert "s" not in strict and strict.stats().used_blocks == 0
        r = lenient.allocate(AllocationRequest(request_id="l", prompt_token_ids=prompt(1, 22)))
        assert r.num_cached_tokens() == 0 and lenient.stats().store_errors == 1
        assert lenient.store_stats().timeouts == 1
    finally:
        fresh_redis.resume()
    r = strict.allocate(AllocationRequest(request_id="s", prompt_token_ids=prompt(1, 22)))
    assert r.num_cached_tokens() == 20
    assert_holds(strict, r, prompt(1, 22))
    strict.close()
    lenient.close()


def test_a_cluster_master_killed_during_a_run(fresh_cluster):  # noqa: F811
    """Two engine threads (one manager each) allocate, write and read prompts while a
    master dies: every read is the truth, no call raises, the run completes; afterwards
    prompts whose blocks live on the other masters are still served from the store."""
    url = f"{fresh_cluster.url}?{FAST}&node_cooldown=0.5"
    prompts = [prompt(500 + i, 30) for i in range(12)]
    with KvCacheManager(cfg(url), backend="numpy") as seed:
        for i, tokens in enumerate(prompts):
            seed.deallocate(prefill(seed, f"w{i}", tokens))
    problems: list[str] = []
    served = [0, 0]
    stop = threading.Event()

    def engine(slot: int) -> None:
        mgr = KvCacheManager(cfg(url, num_blocks=32), backend="numpy")
        i = 0
        while not stop.is_set():
            tokens = prompts[i % len(prompts)]
            try:
                h = prefill(mgr, f"r{i}", tokens)
                served[slot] += h.num_cached_tokens()
                assert_holds(mgr, h, tokens)
                mgr.deallocate(h)
                mgr.gc()  # forget the local copy: ask the store again next time
            except Exception as exc:  # noqa: BLE001 - the run must see none
                problems.append(f"{type(exc).__name__}: {exc}")
                return
            i += 1
        mgr.close()

    workers = [threading.Thread(target=engine, args=(k,)) for k in range(2)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    before = list(served)
    fresh_cluster.nodes[1].kill()
    time.sleep(1.5)
    fresh_cluster.wait_node_failed(fresh_cluster.nodes[1])
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers)
    assert problems == []
    assert all(b > 0 for b in before) and all(s > b for s, b in zip(served, before))
    # After the kill: the prompts whose leading blocks live on the two survivors hit.
    mgr = KvCacheManager(cfg(url, num_blocks=128), backend="numpy")
    hits = [prefill(mgr, f"after{i}", t).num_cached_tokens() for i, t in enumerate(prompts)]
    assert any(h > 0 for h in hits) and any(h < 28 for h in hits)
    for i, tokens in enumerate(prompts):
        assert_holds(mgr, mgr.get_handle(f"after{i}"), tokens)
    assert mgr.stats().store_corrupt_misses == 0
    mgr.close()
