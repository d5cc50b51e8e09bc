"""The ``prompt_copy`` workload: K/V memory of N copies of a prompt cache, kvcore's
copy-on-write forks against transformers ``DynamicCache`` deep copies.

The measurement belongs to the transformers integration
(:mod:`kvcore.integrations._prompt_copy_bench`); this module reports it.
"""

from __future__ import annotations

from .._backend import Backend
from ._generate import _jsonable, find_generation_bench
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import Progress, clock

__all__ = ["run_prompt_copy"]


def run_prompt_copy(backend: Backend, p: BenchParams, progress: Progress) -> WorkloadResult:
    """Copy a prefilled ``copy_prompt``-token cache ``copies`` times on ``backend``."""
    _, why = find_generation_bench()  # the same requirements: torch and transformers
    if why.startswith("needs"):
        raise LookupError(why)
    from ..integrations._prompt_copy_bench import benchmark_prompt_copy

    began = clock()
    raw = benchmark_prompt_copy(
        backend=backend.name, prompt_len=p.copy_prompt, copies=p.copies,
        block_size=p.block_size, seed=p.seed, repeats=p.repeats, threads=None,
        progress=lambda message: progress(f"[{backend.name}] prompt_copy: {message}"))
    result = WorkloadResult("prompt_copy", backend.name, wall_s=clock() - began,
                            details=_jsonable(raw))
    n = p.copies
    label = f"DynamicCache + {n} deep copies"
    result.add(Figure("copies_kv_bytes", raw["kvcore_copy_bytes"], "B",
                      raw["dynamic_copy_bytes"], f"{n} DynamicCache deep copies",
                      raw["kvcore_copy_bytes"] / raw["dynamic_copy_bytes"], "kvcore / DynamicCache",
                      "0 bytes until a copy writes", raw["kvcore_copy_bytes"] == 0))
    result.add(Figure("held_kv_bytes", raw["kvcore_bytes"], "B", raw["dynamic_bytes"], label,
                      raw["kvcore_bytes"] / raw["dynamic_bytes"], "kvcore / DynamicCache"))
    result.add(Figure("held_kv_bytes_after_one_token", raw["kvcore_bytes_after_token"], "B",
                      raw["dynamic_bytes_after_token"], label,
                      raw["kvcore_bytes_after_token"] / raw["dynamic_bytes_after_token"],
                      "kvcore / DynamicCache"))
    result.add(Figure("copy_s", raw["kvcore_copy_s"], "s", raw["dynamic_copy_s"],
                      "DynamicCache deepcopy", raw["kvcore_copy_s"] / raw["dynamic_copy_s"],
                      "kvcore / DynamicCache (lower is better)"))
    result.details["identical_tokens"] = bool(raw["identical"])
    if not raw["identical"]:
        raise AssertionError("prompt_copy: a copy's next token differed between kvcore and "
                             "DynamicCache")
    return result
