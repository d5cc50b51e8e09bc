"""A manager's statistics for monitoring: Prometheus metrics and periodic log lines.

Prometheus (``pip install "kvcore[metrics]"``, which brings ``prometheus_client``)::

    from prometheus_client import start_http_server
    import kvcore.metrics

    kvcore.metrics.register(manager)          # the default registry, manager="default"
    start_http_server(9400)                   # http://localhost:9400/metrics

The collector reads :meth:`KvCacheManager.stats` when Prometheus scrapes, never in
between: the figures are always current and cost nothing until someone asks.  Every
metric carries a ``manager`` label, so one collector can serve several managers
(``ManagerCollector({"main": a, "draft": b})``).

Which metric each field of :class:`~kvcore.CacheManagerStats` becomes is decided by
:func:`metric_specs`: the fields this module knows are classified and named by hand
(counters end in ``_total``, units are in the names); a field added later is exported
without a change here, as a counter when it is an integer whose name says it counts
events (``store_hits``, ``prefix_cache_hit_tokens``), else as a gauge.  Fields that make
no sense as a number are listed in :data:`EXCLUDED` with the reason.

Logs (no extra needed)::

    handle = kvcore.metrics.log_stats_periodically(manager, 60.0)   # logger "kvcore.metrics"
    ...
    handle.stop()

or :func:`format_stats` on any ``stats()`` for a one-line ``key=value`` summary.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .models import CacheManagerStats

__all__ = ["EXCLUDED", "ManagerCollector", "MetricSpec", "StatsLogger", "format_stats",
           "log_stats_periodically", "metric_specs", "register"]

METRICS_HINT = 'pip install "kvcore[metrics]"'
NAMESPACE = "kvcore"

#: Known fields, by hand: (kind, metric name without namespace or ``_total``, help).
_KNOWN: dict[str, tuple[Literal["counter", "gauge", "state"], str, str]] = {
    "total_blocks": ("gauge", "pool_blocks", "Blocks in the pool"),
    "free_blocks": ("gauge", "free_blocks", "Blocks holding no reusable data"),
    "cached_blocks": ("gauge", "cached_blocks",
                      "Unreferenced blocks still holding a prefix-cached block (evictable)"),
    "used_blocks": ("gauge", "used_blocks", "Blocks referenced by at least one sequence"),
    "block_size": ("gauge", "block_size_tokens", "Tokens per block"),
    "memory_bytes": ("gauge", "pool_memory_bytes", "Bytes of the whole pool"),
    "used_memory_bytes": ("gauge", "used_memory_bytes", "Bytes of the blocks in use"),
    "active_caches": ("gauge", "active_sequences", "Sequences resident in the pool"),
    "swapped_caches": ("gauge", "swapped_sequences", "Sequences swapped out"),
    "swap_total_blocks": ("gauge", "swap_pool_blocks", "Blocks in the swap pool"),
    "swap_free_blocks": ("gauge", "swap_free_blocks", "Free blocks in the swap pool"),
    "prefix_cache_queries": ("counter", "prefix_cache_query_blocks",
                             "Full prompt blocks looked up in the prefix cache"),
    "prefix_cache_hits": ("counter", "prefix_cache_hit_blocks",
                          "Prompt blocks served from the prefix cache"),
    "prefix_cache_hit_rate": ("gauge", "prefix_cache_hit_ratio",
                              "Hit blocks / queried blocks since the manager started"),
    "prefix_cache_query_tokens": ("counter", "prefix_cache_query_tokens",
                                  "Prompt tokens of requests allocated with token ids "
                                  "(vLLM's prefix-cache queries)"),
    "prefix_cache_hit_tokens": ("counter", "prefix_cache_hit_tokens",
                                "Prompt tokens served from the prefix cache (vLLM's hits)"),
    "evictions": ("counter", "evicted_blocks", "Prefix-cached blocks evicted for reuse"),
    "allocations": ("counter", "sequence_allocations", "Sequences allocated (forks included)"),
    "allocation_failures": ("counter", "allocation_failures",
                            "Operations refused for lack of blocks (allocate, extend, "
                            "copy-on-write)"),
    "copy_on_write_copies": ("counter", "copy_on_write_blocks", "Blocks copied on write"),
    "window_released_blocks": ("counter", "window_released_blocks",
                               "Blocks sliding windows gave back while their sequences went on"),
    "pressure": ("state", "memory_pressure", "Memory-pressure level (1 for the current one)"),
    "utilization": ("gauge", "utilization_ratio", "Fraction of the pool's blocks in use"),
}

#: Fields deliberately not exported, with the reason (none yet: every field is a number
#: or a state).  A field that is neither must be listed here, or a test fails.
EXCLUDED: dict[str, str] = {}

#: A field this module does not know yet is a counter when it is an integer and one of
#: these words is in its name: it counts events, which only ever go up.
_EVENT_WORDS = frozenset({
    "hit", "hits", "miss", "misses", "missed", "query", "queries", "queried", "eviction",
    "evictions", "evicted", "allocations", "failure", "failures", "failed", "copies",
    "copied", "error", "errors", "written", "writes", "reads", "stored", "loaded",
    "dropped", "drops", "timeouts", "retries", "requests"})
#: ... unless one of these says it is a level, not a count (``store_pending_writes``).
_LEVEL_WORDS = frozenset({"pending", "queued", "inflight", "active", "current", "free",
                          "used", "rate", "ratio"})
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass(frozen=True)
class MetricSpec:
    """How one stats field is exported."""

    field: str
    kind: Literal["counter", "gauge", "state"]
    #: The metric's name, namespace included, ``_total`` excluded (counters get it in
    #: the exposition).
    name: str
    documentation: str
    #: For ``state``: the enum's values, one sample each.
    states: tuple[str, ...] = ()

    @property
    def exposed_name(self) -> str:
        """The sample name a scrape shows (``..._total`` for counters)."""
        return self.name + "_total" if self.kind == "counter" else self.name


def _base_type(annotation: Any) -> Any:
    """``int`` for ``int``, ``NonNegativeInt``, ``int | None``; the enum class for
    enums; ``None`` for anything that is not one number."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_base_type(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return annotation
        if issubclass(annotation, bool):
            return None
        if issubclass(annotation, (int, float)):
            return int if issubclass(annotation, int) else float
    return None


def _classify(field: str, base: Any) -> tuple[Literal["counter", "gauge", "state"], str, str]:
    """The rule for a field this module does not know yet."""
    words = set(field.split("_"))
    doc = f"CacheManagerStats.{field}"
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "state", field, doc
    if base is int and words & _EVENT_WORDS and not words & _LEVEL_WORDS:
        return "counter", field[:-len("_total")] if field.endswith("_total") else field, doc
    return "gauge", field, doc


def metric_specs(stats_type: type[CacheManagerStats] = CacheManagerStats,
                 namespace: str = NAMESPACE) -> list[MetricSpec]:
    """One :class:`MetricSpec` per exported field of ``stats_type``, in field order.

    Raises ``TypeError`` naming the field when a field is neither a number, an enum,
    nor listed in :data:`EXCLUDED`: exporting it needs a decision, not a guess."""
    specs = []
    for field, info in stats_type.model_fields.items():
        if field in EXCLUDED:
            continue
        base = _base_type(info.annotation)
        if base is None:
            raise TypeError(f"CacheManagerStats.{field} ({info.annotation!r}) is not a number "
                            "or an enum: export it by hand or list it in "
                            "kvcore.metrics.EXCLUDED with the reason")
        kind, name, doc = _KNOWN.get(field) or _classify(field, base)
        states = tuple(m.value for m in base) if kind == "state" else ()
        full = f"{namespace}_{name}" if namespace else name
        if not _METRIC_NAME.match(full):
            raise ValueError(f"metric name {full!r} (from field {field!r}) is not a valid "
                             "Prometheus name")
        specs.append(MetricSpec(field, kind, full, doc, states))
    return specs


def _families() -> Any:
    try:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError as exc:
        raise ImportError(f"kvcore.metrics needs prometheus_client for Prometheus export: "
                          f"{METRICS_HINT}") from exc
    return CounterMetricFamily, GaugeMetricFamily


class ManagerCollector:
    """A ``prometheus_client`` collector over one or more managers.

    ``managers`` is a manager (labelled ``manager="default"``) or a mapping of label
    to manager.  Register it with ``registry.register(collector)``, or use
    :func:`register`.  Each scrape calls every manager's ``stats()`` once."""

    def __init__(self, managers: Any = None, *, namespace: str = NAMESPACE) -> None:
        _families()  # fail now, with the install command, not at the first scrape
        self._lock = threading.Lock()
        self._managers: dict[str, Any] = {}
        self._namespace = namespace
        if managers is None:
            managers = {}
        elif not isinstance(managers, Mapping):
            managers = {"default": managers}
        for label, manager in managers.items():
            self.add(label, manager)

    def add(self, label: str, manager: Any) -> None:
        """Export ``manager`` too, under ``manager=label``."""
        if not isinstance(label, str) or not label:
            raise ValueError(f"a manager's label must be a non-empty string, got {label!r}")
        if not callable(getattr(manager, "stats", None)):
            raise TypeError(f"manager {label!r}: expected a KvCacheManager (something with "
                            f"stats()), got {type(manager).__name__}")
        with self._lock:
            if label in self._managers:
                raise ValueError(f"a manager labelled {label!r} is already exported; "
                                 f"labels: {', '.join(sorted(self._managers))}")
            self._managers[label] = manager

    def remove(self, label: str) -> None:
        """Stop exporting the manager labelled ``label``."""
        with self._lock:
            if self._managers.pop(label, None) is None:
                raise KeyError(f"no manager labelled {label!r} is exported; labels: "
                               f"{', '.join(sorted(self._managers)) or 'none'}")

    def _specs(self, stats_type: type[CacheManagerStats]) -> list[MetricSpec]:
        return metric_specs(stats_type, self._namespace)

    def describe(self) -> list[Any]:
        """The metric families without samples: lets a registry check names at
        registration without reading any manager."""
        return list(self._build({}, self._specs(CacheManagerStats)))

    def collect(self) -> Iterator[Any]:
        """Read each manager's ``stats()`` now, and yield the metric families."""
        with self._lock:
            managers = dict(self._managers)
        snapshots = {label: m.stats() for label, m in managers.items()}
        stats_type = (type(next(iter(snapshots.values()))) if snapshots
                      else CacheManagerStats)
        yield from self._build(snapshots, self._specs(stats_type))

    @staticmethod
    def _build(snapshots: dict[str, CacheManagerStats], specs: list[MetricSpec]) -> Iterator[Any]:
        counter_family, gauge_family = _families()
        for spec in specs:
            if spec.kind == "counter":
                family = counter_family(spec.name, spec.documentation, labels=["manager"])
            else:
                labels = ["manager", "state"] if spec.kind == "state" else ["manager"]
                family = gauge_family(spec.name, spec.documentation, labels=labels)
            for label, stats in snapshots.items():
                value = getattr(stats, spec.field)
                if spec.kind == "state":
                    current = value.value if isinstance(value, enum.Enum) else value
                    for state in spec.states:
                        family.add_metric([label, state], 1.0 if state == current else 0.0)
                else:
                    family.add_metric([label], float(value))
            yield family


def register(manager: Any, *, label: str = "default", registry: Any = None,
             namespace: str = NAMESPACE) -> ManagerCollector:
    """Export ``manager`` through ``registry`` (default: prometheus_client's global
    ``REGISTRY``) and return the collector (``registry.unregister(collector)`` stops it)."""
    collector = ManagerCollector({label: manager}, namespace=namespace)
    if registry is None:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    registry.register(collector)
    return collector


# --- logs ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_stats(stats: CacheManagerStats, since: CacheManagerStats | None = None) -> str:
    """``stats`` as one ``key=value`` line (logfmt), every field in order.

    With ``since`` (an earlier ``stats()`` of the same manager), each counter also gets
    ``<field>_delta``: what happened in between."""
    kinds = {s.field: s.kind for s in metric_specs(type(stats))}
    parts = []
    for field in type(stats).model_fields:
        value = getattr(stats, field)
        parts.append(f"{field}={_fmt(value)}")
        if since is not None and kinds.get(field) == "counter":
            parts.append(f"{field}_delta={value - getattr(since, field):+d}")
    return " ".join(parts)


class StatsLogger:
    """A daemon thread logging a manager's :func:`format_stats` every interval; see
    :func:`log_stats_periodically`.  ``stop()`` (or leaving a ``with`` block) ends it."""

    def __init__(self, manager: Any, interval_s: float, logger: logging.Logger,
                 level: int, label: str) -> None:
        self._manager, self._interval, self._logger = manager, interval_s, logger
        self._level, self._label = level, label
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvcore-stats-{label}",
                                        daemon=True)

    def _run(self) -> None:
        previous = None
        while not self._stopped.wait(self._interval):
            try:
                stats = self._manager.stats()
                self._logger.log(self._level, "kvcore stats manager=%s %s", self._label,
                                 format_stats(stats, previous))
                previous = stats
            except Exception:  # a logging thread must outlive one bad read
                self._logger.exception("kvcore stats manager=%s: reading stats failed",
                                       self._label)

    def start(self) -> StatsLogger:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop logging and wait (up to ``timeout`` seconds) for the thread to end."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_stats_periodically(manager: Any, interval_s: float,
                           logger: logging.Logger | None = None, *, level: int = logging.INFO,
                           label: str = "default") -> StatsLogger:
    """Log ``manager``'s statistics every ``interval_s`` seconds from a daemon thread,
    one line each (``kvcore stats manager=LABEL key=value ...`` with counter deltas),
    to ``logger`` (default: ``logging.getLogger("kvcore.metrics")``).  Returns the
    running :class:`StatsLogger`; call ``stop()`` on it."""
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) \
            or not math.isfinite(interval_s) or interval_s <= 0:
        raise ValueError(f"interval_s must be a finite number of seconds > 0, got {interval_s!r}")
    if not callable(getattr(manager, "stats", None)):
        raise TypeError(f"expected a KvCacheManager (something with stats()), got "
                        f"{type(manager).__name__}")
    return StatsLogger(manager, float(interval_s), logger or logging.getLogger(__name__),
                       level, label).start()
