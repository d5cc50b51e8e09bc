"""The ``kvcore`` command: ``backends``, ``demo``, ``bench``, ``conformance``.

Results go to stdout, problems to stderr; the exit status is non-zero on failure.
Sub-commands that need optional pieces import them only when run.

When the reader of stdout goes away early (``kvcore demo | head -2``), the command
stops quietly with status 1, as the Python documentation recommends for a closed
pipe: no traceback, and no claim that a run whose output was cut short succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._registry import BackendRecord, list_backends
from ._version import __version__
from .errors import KvCoreError
from .stores import _cli as _stores_cli

__all__ = ["main"]

#: Exit status when stdout was closed before the output was written.
EXIT_BROKEN_PIPE = 1
_NO_BACKENDS = 'no kvcore backends installed; try: pip install "kvcore[numpy]"'


def _availability(record: BackendRecord) -> str:
    """``yes``/``no``, or ``not probed`` when only the cheap checks ran and passed:
    a GPU backend whose library is installed may still fail its probe."""
    if not record.available:
        return "no"
    return "yes" if record.probed else "not probed"


def _cmd_backends(args: argparse.Namespace) -> int:
    records = list_backends(probe=not args.no_probe)
    if args.json:
        rows: list[dict[str, Any]] = []
        for r in records:
            row = r.to_dict()
            row["availability"] = _availability(r)
            rows.append(row)
        print(json.dumps(rows, indent=2))  # stays a JSON document even when empty
    if not records:
        print(_NO_BACKENDS, file=sys.stderr)
        return 1
    if args.json:
        return 0
    table = [("name", "available", "distribution", "version", "reason")]
    for r in records:
        table.append((r.name, _availability(r), r.distribution, r.version, r.reason or ""))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
        print(line.rstrip())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.store is not None:
        if args.generate:
            print("kvcore demo: --store and --generate are separate demos; give one",
                  file=sys.stderr)
            return 2
        from ._demo_store import run_store_demo
        return run_store_demo(args.store, backend=args.backend)
    from ._demo import run_demo
    return run_demo(backend=args.backend, generate=args.generate)


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main
    return bench_main(rest)


def _cmd_conformance(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from kvcore_conformance import run
    except ImportError:
        print('the conformance suite is not installed: pip install "kvcore[conformance]"',
              file=sys.stderr)
        return 2
    return run(args.backends, pytest_args=rest)


_BACKEND_DEFAULT = ("default: $KVCORE_BACKEND if set, else numpy if installed, else the "
                    "only installed backend that can run here")

_CONFORMANCE_EPILOG = """\
Every option kvcore does not know is passed on to pytest, for example:
  kvcore conformance mybackend -x -k gather
  kvcore conformance numpy --kv-hypothesis-profile kvcore-thorough

exit status: 0 every named backend passed; otherwise the first non-zero status:
  1 tests failed, 4 a backend is unknown or unavailable (the reason is printed),
  5 no test ran (everything deselected or skipped), 2 the suite is not installed.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcore", description="kvcore: a paged KV cache "
                                     "with pluggable array backends")
    parser.add_argument("--version", action="version", version=f"kvcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list installed backends and whether they can run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-probe", action="store_true",
                   help="do not import array libraries (faster); a backend that passed the "
                        "cheap checks shows as 'not probed'")
    p = sub.add_parser("demo", help="run a small workload and check the data it reads back")
    p.add_argument("--backend", default=None, help=f"backend name ({_BACKEND_DEFAULT}; "
                                                   "torch with --generate)")
    p.add_argument("--generate", action="store_true",
                   help="greedy and beam-search generate() with a tiny random Llama through "
                        "transformers, checked against DynamicCache (needs "
                        'pip install "kvcore[transformers]")')
    p.add_argument("--store", metavar="URL", default=None,
                   help="two processes share a prompt through the store at URL "
                        "(redis://host:6379/0, redis+cluster://host:7000, "
                        "file:///path): the second reads back, bit-identical, what the "
                        "first wrote; prints the hit rate")
    sub.add_parser("bench", help="benchmarks (kvcore bench --help)", add_help=False)
    p = sub.add_parser("conformance", help="run the conformance suite on backends",
                       description="Run the kvcore conformance suite against installed "
                                   "backends, one pytest session per backend.",
                       epilog=_CONFORMANCE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backends", nargs="+", metavar="NAME", help="backend names")
    _stores_cli.add_parser(sub)
    return parser


def _run(argv: list[str]) -> int:
    parser = _parser()
    # bench and conformance pass unknown options through (to the bench / to pytest).
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "bench":
            return _cmd_bench(args, argv[argv.index("bench") + 1:])
        if args.command == "conformance":
            return _cmd_conformance(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"backends": _cmd_backends, "demo": _cmd_demo,
                "stores": _stores_cli.run}[args.command](args)
    except KvCoreError as exc:
        print(f"kvcore: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvcore`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at devnull, so the interpreter's final flush of what is still
    buffered cannot raise BrokenPipeError again at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in tests): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
