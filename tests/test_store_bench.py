"""``kvcore bench -w store``: every figure is measured against plain redis-py (or plain
file I/O) in the same run, with its own redis-server or the one named by --store-url;
no Redis means a skip with the reason, never a crash.  No wall-clock thresholds."""

from __future__ import annotations

import json
import math

import pytest

from kvcore.bench import main
from tests.redis_fixtures import redis_server, require_redis  # noqa: F401

FIGURES = ("write_GBps", "read_GBps", "hit_latency", "chunk16_write", "chunk16_read",
           "disk_write_GBps", "disk_read_GBps", "load_prefix")


def _bench(capsys, *args: str) -> dict:
    assert main(["--quick", "--json", "-w", "store", "-b", "numpy", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _check(doc: dict) -> dict:
    [result] = [r for r in doc["results"] if r["workload"] == "store"]
    figs = result["figures"]
    for name in FIGURES:
        fig = figs[name]
        assert math.isfinite(fig["value"]) and fig["value"] > 0, name
        assert fig["baseline"] > 0 and fig["baseline_label"], name
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline"]), name
    for name in ("write_GBps", "read_GBps"):
        assert figs[name]["target"] == ">= 0.8x plain redis-py"
        assert figs[name]["met"] is None  # --quick passes no verdict (sizes too small)
    assert "redis-py" in figs["write_GBps"]["baseline_label"]
    assert figs["chain_keys_per_block"]["value"] > 0 and figs["offer_per_block"]["value"] > 0
    for name in ("chain_keys_per_block", "step_keys_per_block"):
        assert figs[name]["baseline"] > 0 and "in-process" in figs[name]["baseline_label"]
    details = result["details"]
    assert details["blocks"] == 256 // 16 and details["bytes_per_token"] == 2 * 2 * 2 * 64 * 2
    stats = details["connector_stats"]
    assert stats["errors"] == 0 and stats["corrupt_values"] == 0 and stats["hits"] > 0
    assert "with_manager" not in details  # measuring through the manager did not fail
    assert figs["decode_step_with_store"]["target"] == "<= 1.1x"
    for name in ("decode_step_with_store", "load_prefix_via_allocate",
                 "hit_latency_via_allocate"):
        fig = figs[name]
        assert fig["value"] > 0 and fig["baseline"] > 0 and fig["baseline_label"], name
    assert figs["store_hit_per_block"]["value"] > 0
    steps = details["decode_step_with_store"]
    assert steps["blocks_offered"] > 0 and steps["offer_on_engine_thread_per_step_s"] > 0
    assert details["load_prefix_tokens_served"] == 256 - 16  # the last block is computed
    return result


def test_store_workload_starts_its_own_redis_server(capsys):
    require_redis()
    _check(_bench(capsys))


def test_store_workload_uses_the_redis_it_is_given(capsys, redis_server):  # noqa: F811
    result = _check(_bench(capsys, "--store-url", redis_server.url))
    assert result["details"]["store"] == redis_server.url
    import redis
    # It cleans up after itself: no bench keys are left behind.
    assert list(redis.Redis(port=redis_server.port).scan_iter(match="kvc1.bench.*")) == []


def test_no_redis_is_a_skip_with_the_reason(capsys, monkeypatch):
    require_redis()
    import kv_redis.testing
    monkeypatch.setattr(kv_redis.testing, "find_redis_server", lambda: None)
    doc = _bench(capsys)
    assert doc["results"] == []
    [skip] = doc["skipped"]
    assert skip["workload"] == "store" and "no redis-server" in skip["reason"]


def test_a_full_run_passes_a_verdict_on_the_bandwidth_targets(capsys):
    require_redis()
    assert main(["--json", "-q", "-w", "store", "-b", "numpy", "--layers", "2", "--kv-heads", "2",
                 "--head-dim", "64", "--max-prompt", "256", "--repeats", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    figs = doc["results"][0]["figures"]
    for name in ("write_GBps", "read_GBps"):
        assert figs[name]["met"] == (figs[name]["ratio"] >= 0.8)
