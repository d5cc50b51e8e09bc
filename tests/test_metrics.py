"""kvcore.metrics: a manager's statistics through a real prometheus_client registry, and
as periodic log lines."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import NonNegativeInt

import kvcore
from kvcore.metrics import (EXCLUDED, ManagerCollector, format_stats, log_stats_periodically,
                            metric_specs, register)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def _busy_manager() -> kvcore.KvCacheManager:
    """A manager with a little of everything: prefix hits, a fork with a copy on write,
    a deallocation leaving cached blocks, a refused allocation."""
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32",
                             block_size=4, num_blocks=16)
    mgr = kvcore.KvCacheManager(cfg, backend="numpy")
    prompt = list(range(10))
    a = mgr.allocate(kvcore.AllocationRequest(request_id="a", prompt_token_ids=prompt))
    kv = np.ones((10, 1, 4), np.float32)
    mgr.write(a, 0, kv, kv)
    mgr.allocate(kvcore.AllocationRequest(request_id="b", prompt_token_ids=prompt))
    child = mgr.fork(a, "a/1")
    mgr.extend(child, 1)
    one = np.ones((1, 1, 4), np.float32)
    mgr.write(child, 0, one, one)
    mgr.deallocate("b")
    other = list(range(100, 108))  # two full blocks of its own, cached once freed
    c = mgr.allocate(kvcore.AllocationRequest(request_id="c", prompt_token_ids=other))
    mgr.write(c, 0, kv[:8], kv[:8])
    mgr.deallocate("c")
    with pytest.raises(kvcore.errors.OutOfBlocksError):
        mgr.allocate(kvcore.AllocationRequest(request_id="huge", num_tokens=1000))
    return mgr


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_stats_field_is_exported_or_explicitly_excluded():
    exported = {spec.field for spec in metric_specs()}
    fields = set(kvcore.CacheManagerStats.model_fields)
    assert exported | set(EXCLUDED) == fields
    assert not exported & set(EXCLUDED)
    assert all(reason for reason in EXCLUDED.values())


def test_names_follow_prometheus_conventions():
    specs = metric_specs()
    names = [s.exposed_name for s in specs]
    assert len(set(names)) == len(names)
    for spec in specs:
        assert spec.name.startswith("kvcore_") and not spec.name.endswith("_total")
        assert spec.exposed_name.endswith("_total") == (spec.kind == "counter")
    kinds = {s.field: (s.kind, s.exposed_name) for s in specs}
    assert kinds["evictions"] == ("counter", "kvcore_evicted_blocks_total")
    assert kinds["prefix_cache_hits"] == ("counter", "kvcore_prefix_cache_hit_blocks_total")
    assert kinds["used_memory_bytes"] == ("gauge", "kvcore_used_memory_bytes")
    assert kinds["total_blocks"] == ("gauge", "kvcore_pool_blocks")  # no "total" on a gauge
    assert kinds["utilization"] == ("gauge", "kvcore_utilization_ratio")
    assert kinds["pressure"] == ("state", "kvcore_memory_pressure")


def test_a_scrape_exports_every_field_with_the_managers_values():
    mgr = _busy_manager()
    registry = CollectorRegistry()
    register(mgr, registry=registry, label="main")
    samples = _scrape(registry)
    stats = mgr.stats()
    assert stats.prefix_cache_hits > 0 and stats.copy_on_write_copies > 0
    assert stats.cached_blocks > 0 and stats.allocation_failures == 1
    for spec in metric_specs():
        value = getattr(stats, spec.field)
        if spec.kind == "state":
            for state in spec.states:
                key = (spec.name, (("manager", "main"), ("state", state)))
                assert samples[key] == (1.0 if state == value.value else 0.0), key
        else:
            assert samples[(spec.exposed_name, (("manager", "main"),))] == \
                pytest.approx(float(value)), spec


def test_counters_are_typed_as_counters_in_the_exposition():
    registry = CollectorRegistry()
    register(_busy_manager(), registry=registry)
    text = generate_latest(registry).decode()
    assert "# TYPE kvcore_evicted_blocks_total counter" in text or \
        "# TYPE kvcore_evicted_blocks counter" in text
    assert "# TYPE kvcore_used_blocks gauge" in text
    assert re.search(r'^kvcore_sequence_allocations_total\{manager="default"\} 4\.0$', text, re.M)


def test_stats_are_read_at_scrape_time_only(config):
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    calls = []
    real = mgr.stats
    mgr.stats = lambda: calls.append(1) or real()  # type: ignore[method-assign]
    registry = CollectorRegistry()
    register(mgr, registry=registry)
    mgr.allocate(kvcore.AllocationRequest(request_id="x", num_tokens=5))
    assert calls == []  # registering and working cost nothing
    assert _scrape(registry)[("kvcore_used_blocks", (("manager", "default"),))] == 2.0
    assert calls == [1]
    mgr.allocate(kvcore.AllocationRequest(request_id="y", num_tokens=9))
    assert _scrape(registry)[("kvcore_used_blocks", (("manager", "default"),))] == 5.0
    assert calls == [1, 1]  # always current: read again at the next scrape


def test_one_collector_serves_several_managers_by_label(config):
    a = kvcore.KvCacheManager(config, backend="numpy")
    b = kvcore.KvCacheManager(config, backend="numpy")
    b.allocate(kvcore.AllocationRequest(request_id="x", num_tokens=5))
    collector = ManagerCollector({"main": a})
    collector.add("draft", b)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = _scrape(registry)
    assert samples[("kvcore_used_blocks", (("manager", "main"),))] == 0.0
    assert samples[("kvcore_used_blocks", (("manager", "draft"),))] == 2.0
    with pytest.raises(ValueError, match="'draft' is already exported"):
        collector.add("draft", a)
    with pytest.raises(ValueError, match="non-empty string"):
        collector.add("", a)
    with pytest.raises(TypeError, match="got int"):
        collector.add("bad", 3)
    collector.remove("draft")
    assert ("kvcore_used_blocks", (("manager", "draft"),)) not in _scrape(registry)
    with pytest.raises(KeyError, match="'draft'"):
        collector.remove("draft")


def test_two_registrations_of_one_label_are_refused_by_the_registry(config):
    registry = CollectorRegistry()
    register(kvcore.KvCacheManager(config, backend="numpy"), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        register(kvcore.KvCacheManager(config, backend="numpy"), registry=registry)


class _FutureStats(kvcore.CacheManagerStats):
    """Fields other issues may add: each must be exported without touching metrics.py."""

    prefix_cache_query_tokens: NonNegativeInt = 0
    prefix_cache_hit_tokens: NonNegativeInt = 0
    store_hits: int = 0
    store_misses: int | None = 0
    store_pending_writes: int = 0
    store_bytes: NonNegativeInt = 0
    store_read_latency_s: float = 0.0


def test_fields_added_later_are_exported_by_the_generic_rule(config, monkeypatch):
    specs = {s.field: (s.kind, s.exposed_name) for s in metric_specs(_FutureStats)}
    for tokens in ("prefix_cache_query_tokens", "prefix_cache_hit_tokens"):
        assert specs[tokens] == ("counter", f"kvcore_{tokens}_total")
    assert specs["store_hits"] == ("counter", "kvcore_store_hits_total")
    assert specs["store_misses"] == ("counter", "kvcore_store_misses_total")
    assert specs["store_pending_writes"] == ("gauge", "kvcore_store_pending_writes")
    assert specs["store_bytes"] == ("gauge", "kvcore_store_bytes")
    assert specs["store_read_latency_s"] == ("gauge", "kvcore_store_read_latency_s")
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    real = mgr.stats
    monkeypatch.setattr(mgr, "stats", lambda: _FutureStats(**{**real().model_dump(), "store_hits": 7}))
    registry = CollectorRegistry()
    register(mgr, registry=registry)
    assert _scrape(registry)[("kvcore_store_hits_total", (("manager", "default"),))] == 7.0


def test_a_field_that_is_not_a_number_needs_a_decision():
    class Odd(kvcore.CacheManagerStats):
        backend_name: str = "numpy"

    with pytest.raises(TypeError, match=r"CacheManagerStats\.backend_name .*EXCLUDED"):
        metric_specs(Odd)


def test_without_prometheus_client_the_error_names_the_extra(config, monkeypatch):
    for name in ("prometheus_client", "prometheus_client.core"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    with pytest.raises(ImportError, match=re.escape('pip install "kvcore[metrics]"')):
        ManagerCollector(mgr)
    assert "used_blocks=0" in format_stats(mgr.stats())  # logs need no extra


def test_import_kvcore_loads_neither_the_metrics_nor_prometheus_client():
    code = ("import sys, kvcore; bad = [m for m in sys.modules if m.startswith("
            "('kvcore.metrics', 'prometheus_client'))]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_format_stats_is_one_logfmt_line_with_counter_deltas(config):
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    before = mgr.stats()
    mgr.allocate(kvcore.AllocationRequest(request_id="x", num_tokens=5))
    line = format_stats(mgr.stats(), since=before)
    pairs = dict(part.split("=", 1) for part in line.split())
    assert set(kvcore.CacheManagerStats.model_fields) <= set(pairs)
    assert pairs["used_blocks"] == "2" and pairs["pressure"] == "low"
    assert pairs["allocations_delta"] == "+1" and pairs["evictions_delta"] == "+0"
    assert "used_blocks_delta" not in pairs  # gauges have no delta
    assert "\n" not in line


class _Records(logging.Handler):
    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.enough = threading.Event()
        self.wanted = wanted

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if len(self.records) >= self.wanted:
            self.enough.set()


def test_periodic_logging_writes_summaries_until_stopped(config):
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    logger = logging.getLogger("kvcore.test.metrics")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Records(wanted=2)
    logger.addHandler(handler)
    try:
        with log_stats_periodically(mgr, 0.01, logger, label="main") as handle:
            assert handle.running
            mgr.allocate(kvcore.AllocationRequest(request_id="x", num_tokens=5))
            assert handler.enough.wait(30), "no periodic summary was logged"
        assert not handle.running  # leaving the block stopped and joined the thread
        count = len(handler.records)
        first, second = (r.getMessage() for r in handler.records[:2])
        assert first.startswith("kvcore stats manager=main total_blocks=32 ")
        assert "allocations_delta=" not in first and "allocations_delta=" in second
        assert all(r.levelno == logging.INFO for r in handler.records)
        assert len(handler.records) == count  # nothing after stop
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), float("inf"), True, "60"])
def test_periodic_logging_refuses_a_bad_interval(config, interval):
    mgr = kvcore.KvCacheManager(config, backend="numpy")
    with pytest.raises(ValueError, match="interval_s must be a finite number of seconds > 0"):
        log_stats_periodically(mgr, interval)


def test_periodic_logging_refuses_something_that_is_not_a_manager():
    with pytest.raises(TypeError, match="got str"):
        log_stats_periodically("manager", 1.0)


def test_the_metrics_doc_lists_exactly_the_exported_metrics():
    documented = set(re.findall(r"^\| `(kvcore_[a-z_]+)`", DOCS.read_text(), flags=re.M))
    assert documented == {s.exposed_name for s in metric_specs()}
