"""The ``kvcore`` command: ``backends``, ``demo``, ``bench``, ``conformance``.

Results go to stdout, problems to stderr; the exit status is non-zero on failure.
Sub-commands that need optional pieces import them only when run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ._registry import list_backends
from .errors import KvCoreError
from .stores import _cli as _stores_cli

__all__ = ["main"]


def _cmd_backends(args: argparse.Namespace) -> int:
    records = list_backends(probe=not args.no_probe)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    if not records:
        print('no kvcore backends installed; try: pip install "kvcore[numpy]"', file=sys.stderr)
        return 1
    rows = [("name", "available", "distribution", "version", "reason")]
    for r in records:
        rows.append((r.name, "yes" if r.available else "no", r.distribution, r.version,
                     r.reason or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcore", description="kvcore: a paged KV cache "
                                     "with pluggable array backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list installed backends and whether they can run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-probe", action="store_true",
                   help="do not import array libraries (faster; availability unprobed)")
    p = sub.add_parser("demo", help="run a small workload and check the data it reads back")
    p.add_argument("--backend", default=None, help="backend name (default: $KVCORE_BACKEND or numpy)")
    p.add_argument("--generate", action="store_true",
                   help="greedy generation with a tiny Llama through transformers (torch)")
    sub.add_parser("bench", help="benchmarks (kvcore bench --help)", add_help=False)
    p = sub.add_parser("conformance", help="run the conformance suite on backends",
                       add_help=True)
    p.add_argument("backends", nargs="+", help="backend names")
    _stores_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
