"""The ``generate`` workload: end-to-end greedy generation, kvcore vs DynamicCache.

The generation benchmark itself belongs to the transformers integration
(``kvcore.integrations``); this module only finds it and reports what it returns.  It
looks for ``benchmark_generation(...) -> dict`` in the modules below, in order, and
reports the workload as skipped (with the reason) when none provides it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

from .._backend import Backend
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import Progress, clock

__all__ = ["find_generation_bench", "run_generate"]

#: Where the integration may define ``benchmark_generation``.
CANDIDATES = ("kvcore.integrations._generation_bench", "kvcore.integrations._demo_generate")


def find_generation_bench() -> tuple[Callable[..., dict[str, Any]] | None, str]:
    """The integration's ``benchmark_generation`` and where it lives, or ``None`` and
    why not, in words for the user (the install command, not module paths)."""
    missing = [lib for lib in ("torch", "transformers") if not _installed(lib)]
    if missing:
        return None, (f"needs {' and '.join(missing)}, not installed here: "
                      f'pip install "kvcore[transformers]"')
    reasons = []
    for name in CANDIDATES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        fn = getattr(module, "benchmark_generation", None)
        if callable(fn):
            return fn, name
        reasons.append(f"{name} has no benchmark_generation")
    return None, "the transformers integration has no generation benchmark (" + \
        "; ".join(reasons) + ")"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def run_generate(backend: Backend, p: BenchParams, progress: Progress,
                 quick: bool) -> WorkloadResult:
    """Call the integration's benchmark and turn its numbers into figures."""
    fn, where = find_generation_bench()
    if fn is None:
        raise LookupError(f"no generation benchmark is installed ({where})")
    progress(f"[{backend.name}] generate: tiny random Llama, generate() on kvcore and on "
             "DynamicCache")
    began = clock()
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    # Pass only what the integration's signature takes: it owns its own defaults.
    wanted: list[tuple[str, Any]] = [
        ("backend", backend.name), ("quick", quick), ("seed", p.seed),
        ("progress", lambda message: progress(f"[{backend.name}] generate: {message}"))]
    if quick:  # a smoke run: fewer rounds and tokens, when the integration takes them
        wanted += [("repeats", 2), ("warmup", 1), ("new_tokens", 8)]
    for key, value in wanted:
        if key in accepted:
            kwargs[key] = value
    raw = fn(**kwargs)
    result = WorkloadResult("generate", backend.name, wall_s=clock() - began,
                            details={"source": where, "returned": _jsonable(raw)})
    kv = _first(raw, ("kvcore_tokens_per_s", "kvcore_tok_s", "kvcore"))
    base = _first(raw, ("dynamic_cache_tokens_per_s", "dynamiccache_tokens_per_s",
                        "dynamic_tokens_per_s", "baseline_tokens_per_s", "dynamic_cache"))
    if isinstance(raw, dict) and "identical" in raw:
        result.details["identical_tokens"] = bool(raw["identical"])
    if kv is not None:
        result.add(Figure("generate_tokens_per_s", kv, "tok/s", base,
                          "transformers DynamicCache" if base is not None else None,
                          kv / base if base else None, "kvcore / DynamicCache"))
    return result


def _first(raw: Any, keys: tuple[str, ...]) -> float | None:
    if not isinstance(raw, dict):
        return None
    for key in keys:
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
