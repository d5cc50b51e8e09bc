"""``kvcore bench``: argument parsing and the run loop over backends and workloads."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence

from .._backend import Backend
from .._registry import get_backend, list_backends
from ..errors import KvCoreError
from ._params import QUICK, BenchParams
from ._report import (PLOT_HINT, QUICK_NOTE, check_plot_path, document, dumps, render_table,
                      write_plot)
from ._result import WorkloadResult
from ._targets import judge, load_baseline
from ._timing import Progress, clock

__all__ = ["WORKLOADS", "main"]

#: Every workload, in the order they run.
WORKLOADS = ("append", "read", "blocks", "fork", "generate", "prompt_copy", "store", "memory")
#: What runs without ``--workload``: ``generate`` joins when its integration exists
#: (``prompt_copy``, ``store`` and ``memory`` run when asked for).
DEFAULT_WORKLOADS = ("append", "read", "blocks", "fork")

_HELP = {
    "layers": "model layers (append, read, fork)", "kv_heads": "KV heads",
    "head_dim": "head dimension", "dtype": "cache dtype (float16, float32, bfloat16; append/read also float8_e4m3, "
             "float8_e5m2, int8)",
    "block_size": "tokens per block", "batch": "sequences in the append batch",
    "prompt": "prompt tokens per sequence (append)", "decode_steps": "decode steps (append)",
    "pool_blocks": "blocks in the pool (blocks)", "sequences": "requests served (blocks)",
    "max_prompt": "prompt lengths are uniform in 1..N (blocks)",
    "appends": "tokens appended one at a time per request (blocks)",
    "shared_prefix": "tokens of the prefix shared by half the prompts (blocks)",
    "hit_sequences": "requests served entirely from the prefix cache (blocks)",
    "fork_tokens": "tokens of the forked sequence (fork)", "fork_children": "children (fork)",
    "copy_prompt": "tokens of the copied prompt cache (prompt_copy)",
    "copies": "copies of the prompt cache (prompt_copy)",
    "memory_tokens": "tokens of the generation whose KV bytes are counted (memory)",
    "repeats": "timed repeats per workload (after one warm-up)", "seed": "random seed",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvcore bench",
        description="Measure kvcore's workloads on every available backend, each figure "
                    "against a baseline timed in the same process.")
    p.add_argument("--workload", "-w", action="append", default=None, metavar="NAME",
                   help=f"workload(s) to run, repeatable or comma-separated: "
                        f"{', '.join(WORKLOADS)} (default: all available)")
    p.add_argument("--backend", "-b", action="append", default=None, metavar="NAME",
                   help="backend(s), repeatable or comma-separated (default: every "
                        "available backend)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--plot", metavar="FILE.png",
                   help=f"write a chart comparing backends and baselines (needs {PLOT_HINT})")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (about a second per workload) for tests and CI; "
                        "quick sizes cannot judge targets, so no verdict is given")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="intra-op threads of array libraries that have them (torch), "
                        "0 leaves the library's default (default 1: on a small shared "
                        "machine, spinning worker threads turn other processes' load "
                        "into 10x outliers)")
    p.add_argument("--check", action="store_true",
                   help="exit with status 3 when a target that was met before is missed "
                        "now (a regression; not with --quick).  'Before' is the targets "
                        "met in the runs recorded in docs/benchmarks.md, or those of "
                        "--baseline")
    p.add_argument("--baseline", metavar="FILE.json", default=None,
                   help="with --check: an earlier run's --json output on this machine; "
                        "a regression is a target it met that this run misses")
    p.add_argument("--store-url", metavar="URL", default=None,
                   help="Redis for the store workload (default: a throwaway redis-server)")
    sizes = p.add_argument_group(
        "workload sizes", "Each size's default is the full run's; --quick starts from "
                          "smaller ones (shown as 'quick'); a size given here overrides both.")
    for f in dataclasses.fields(BenchParams):
        kind = str if f.name == "dtype" else int
        quick = getattr(QUICK, f.name)
        shown = f"default {f.default}" + (f", quick {quick}" if quick != f.default else "")
        sizes.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           metavar="STR" if kind is str else "N",
                           help=f"{_HELP.get(f.name, f.name)} ({shown})")
    p.epilog = ("exit status: 0 measured (and with --check, no target that was met "
                "before is missed), 1 an error (a backend or workload that cannot run), 2 a "
                "usage error (bad option, --plot path that cannot be written), 3 --check "
                "and a regression.  Progress goes to stderr, results to stdout.")
    return p


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _params(args: argparse.Namespace) -> BenchParams:
    base = QUICK if args.quick else BenchParams()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchParams)
                 if getattr(args, f.name) is not None}
    for name, value in overrides.items():
        if isinstance(value, int) and value < (0 if name in ("seed", "decode_steps") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return dataclasses.replace(base, **overrides)


def _backends(names: list[str], skipped: list[dict[str, str]]) -> list[Backend]:
    if names:  # asked for by name: an unavailable one is an error, not a skip
        return [get_backend(n) for n in names]
    chosen = []
    for record in list_backends(probe=True):
        if record.available:
            chosen.append(get_backend(record.name))
        else:
            skipped.append({"backend": record.name, "workload": "*",
                            "reason": record.reason or "unavailable"})
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvcore bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return _run(args, argv)
    except (KvCoreError, ValueError, LookupError) as exc:
        print(f"kvcore bench: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from ._generate import find_generation_bench

    began = clock()
    progress = Progress(enabled=not args.quiet)
    params = _params(args)
    if args.check and args.quick:
        print(f"kvcore bench: error: --check needs the full sizes: {QUICK_NOTE}",
              file=sys.stderr)
        return 2
    if args.baseline and not args.check:
        print("kvcore bench: error: --baseline is for --check", file=sys.stderr)
        return 2
    met_before = None
    if args.baseline:
        try:
            met_before = load_baseline(args.baseline)
        except ValueError as exc:
            print(f"kvcore bench: error: {exc}", file=sys.stderr)
            return 2
    if args.plot:
        # Before anything is measured: a bad path must not cost a whole run.
        problem = check_plot_path(args.plot)
        if problem is not None:
            print(f"kvcore bench: error: {problem}", file=sys.stderr)
            return 2
    progress("kvcore bench: finding backends" + (" (quick sizes)" if args.quick else ""))
    skipped: list[dict[str, str]] = []
    workloads = _split(args.workload)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(WORKLOADS)}")
    gen_fn, gen_why = find_generation_bench()
    if not workloads:
        workloads = list(DEFAULT_WORKLOADS)
        if gen_fn is not None:
            workloads.append("generate")
        else:
            skipped.append({"backend": "*", "workload": "generate", "reason": gen_why})
    backends = _backends(_split(args.backend), skipped)
    if not backends:
        raise LookupError('no kvcore backend is available; try: pip install "kvcore[numpy]"')
    progress(f"kvcore bench: {', '.join(workloads)} on {', '.join(b.name for b in backends)}")

    with _threads(args.threads):
        results = _measure(backends, workloads, params, progress, skipped, args.quick,
                           args.store_url)
    progress.done()
    if args.quick:  # the figures are real, but too small and noisy to pass a verdict on
        for r in results:
            for f in r.figures:
                f.met = None
    doc = document(results, skipped, params.to_dict(), argv, clock() - began,
                   judged=not args.quick)
    doc["threads"] = args.threads
    # Results first, the plot after: a plot that fails to write never loses a run.
    if args.json:
        print(dumps(doc))
    else:
        render_table(results, skipped, sys.stdout, judged=not args.quick)
        print(f"\n{doc['command']}  ({doc['elapsed_s']:.1f} s, {doc['date']}, "
              f"{doc['machine']['processor']}, {doc['machine']['cpus']} cpus)")
    sys.stdout.flush()
    if args.plot:
        try:
            write_plot(results, args.plot)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"kvcore bench: error: the results above are complete, but the plot "
                  f"could not be written to {args.plot}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 1
        progress(f"plot written to {args.plot}")
        progress.done()
    if args.check:
        verdict = judge(doc, met_before)
        for line in verdict.lines():
            print(line, file=sys.stderr)
        if verdict.regressed:
            return 3
    return 0


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Pin torch's intra-op thread count for the run (when torch is loaded), then
    restore it.  numpy's indexing and copies are single-threaded already."""
    torch = sys.modules.get("torch")
    if count < 0:
        raise ValueError(f"--threads must be >= 0, got {count}")
    if torch is None or count == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(backends: list[Backend], workloads: list[str], params: BenchParams,
             progress: Progress, skipped: list[dict[str, str]],
             quick: bool, store_url: str | None = None) -> list[WorkloadResult]:
    from ._append import run_append_read
    from ._blocks import run_blocks
    from ._fork import run_fork
    from ._generate import run_generate
    from ._prompt_copy import run_prompt_copy

    results: list[WorkloadResult] = []
    for backend in backends:
        if "append" in workloads or "read" in workloads:
            results += run_append_read(backend, params, want_append="append" in workloads,
                                       want_read="read" in workloads, progress=progress)
        if "blocks" in workloads:
            results.append(run_blocks(backend, params, progress))
        if "fork" in workloads:
            results.append(run_fork(backend, params, progress))
        if "generate" in workloads:
            try:
                results.append(run_generate(backend, params, progress, quick))
            except Exception as exc:  # an integration problem must not lose the rest
                skipped.append({"backend": backend.name, "workload": "generate",
                                "reason": f"{type(exc).__name__}: {exc}"})
        if "prompt_copy" in workloads:
            try:
                results.append(run_prompt_copy(backend, params, progress))
            except Exception as exc:  # an integration problem must not lose the rest
                skipped.append({"backend": backend.name, "workload": "prompt_copy",
                                "reason": f"{type(exc).__name__}: {exc}"})
        if "store" in workloads:
            from ._store import StoreUnavailable, run_store
            try:
                results.append(run_store(backend, params, progress, store_url))
            except StoreUnavailable as exc:
                skipped.append({"backend": backend.name, "workload": "store", "reason": str(exc)})
        if "memory" in workloads:
            from ._memory import run_memory
            results.append(run_memory(backend, params, progress))
    return results
