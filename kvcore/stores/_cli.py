"""``kvcore stores``: which stores are installed and usable, and is a store reachable.

    kvcore stores                    table of store kinds, availability and reason
    kvcore stores --json             the same, machine-readable
    kvcore stores --check URL        write, read back and delete one probe value
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..errors import KvCoreError
from ._registry import list_stores, open_store
from ._url import redact_url

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the ``stores`` sub-command on the ``kvcore`` parser's subparsers."""
    p = sub.add_parser("stores", help="list installed KV block stores (file, redis, ...) and "
                                      "whether they can run; --check URL tests one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-probe", action="store_true",
                   help="do not import client libraries (faster; availability unprobed)")
    p.add_argument("--check", action="append", default=[], metavar="URL",
                   help="write, read back and delete one probe value at URL (repeatable)")


def _check(url: str) -> dict[str, Any]:
    key = f"kvcore-check.{os.getpid()}.{time.time_ns()}"
    value = os.urandom(4096)
    began = time.perf_counter()
    try:
        with open_store(url) as store:
            store.put([(key, value)])
            back = store.get([key])
            store.delete([key])
    except KvCoreError as exc:
        return {"url": redact_url(url), "ok": False, "error": str(exc)}
    ok = back == [value]
    return {"url": redact_url(url), "ok": ok, "round_trip_ms": (time.perf_counter() - began) * 1e3,
            "error": None if ok else "the value read back differs from the value written"}


def run(args: argparse.Namespace) -> int:
    """Run ``kvcore stores``; returns the exit status."""
    if args.check:
        results = [_check(url) for url in args.check]
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                verdict = (f"ok ({r['round_trip_ms']:.1f} ms for put + get + delete)" if r["ok"]
                           else f"FAILED: {r['error']}")
                print(f"{r['url']}: {verdict}")
        return 0 if all(r["ok"] for r in results) else 1
    records = list_stores(probe=not args.no_probe)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    rows = [("name", "available", "schemes", "distribution", "version", "reason")]
    for r in records:
        rows.append((r.name, "yes" if r.available else "no",
                     ",".join(f"{s}://" for s in r.schemes) or "-", r.distribution, r.version,
                     r.reason or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = sys.stdout
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5]
                  + "\n")
    return 0
