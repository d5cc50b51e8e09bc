#!/usr/bin/env python3
"""GPU bandwidth of kvcore's hot paths against a plain device copy of the same bytes.

Run by ``make gpu-check`` (scripts/gpu_check.py) inside its venv; prints one JSON
document (``--json``) or readable lines.  Figures, per available GPU backend:

* ``decode_write``: one decode step of a batch (``extend_batch`` + ``write_slots`` for
  every layer), in GB/s of K/V written, next to a plain device copy of the same bytes
  with one copy per layer (what writing into a preallocated array costs).  Timed with
  CUDA events over many steps, after warm-up.
* ``swap_out`` / ``swap_in``: a whole sequence of ``--swap-mib`` MiB moved to pinned
  host memory and back through the manager (the calls return complete), in GB/s, next
  to a plain pinned copy of the same bytes in each direction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

HEADS, DIM, BS = 8, 128, 16


def _config(num_layers: int, num_blocks: int, swap_blocks: int = 0) -> Any:
    from kvcore import CacheConfig
    return CacheConfig(num_layers=num_layers, num_kv_heads=HEADS, head_dim=DIM,
                       dtype="float16", block_size=BS, num_blocks=num_blocks, device="cuda:0",
                       swap_blocks=swap_blocks, swap_device="cpu")


class _Torch:
    name = "torch"

    def __init__(self) -> None:
        import torch
        self.t = torch

    def randn(self, shape: tuple[int, ...]) -> Any:
        return self.t.randn(shape, device="cuda:0", dtype=self.t.float16)

    def empty_host(self, nbytes: int) -> Any:
        return self.t.empty(nbytes, dtype=self.t.uint8, pin_memory=True)

    def empty_device(self, nbytes: int) -> Any:
        return self.t.empty(nbytes, dtype=self.t.uint8, device="cuda:0")

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src, non_blocking=True)

    def sync(self) -> None:
        self.t.cuda.synchronize()

    def timer(self) -> tuple[Any, Any]:
        return self.t.cuda.Event(enable_timing=True), self.t.cuda.Event(enable_timing=True)

    @staticmethod
    def record(event: Any) -> None:
        event.record()

    @staticmethod
    def elapsed_ms(start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))


class _Cupy(_Torch):
    name = "cupy"

    def __init__(self) -> None:
        import cupy
        import cupyx
        self.cp, self.cpx = cupy, cupyx

    def randn(self, shape: tuple[int, ...]) -> Any:
        return self.cp.random.standard_normal(shape, dtype=np.float32).astype(np.float16)

    def empty_host(self, nbytes: int) -> Any:
        return self.cpx.empty_pinned((nbytes,), np.uint8)

    def empty_device(self, nbytes: int) -> Any:
        return self.cp.empty((nbytes,), np.uint8)

    def copy(self, dst: Any, src: Any) -> None:
        if isinstance(dst, np.ndarray):
            src.get(out=dst, blocking=False)
        elif isinstance(src, np.ndarray):
            dst.set(src)
        else:
            dst[...] = src

    def sync(self) -> None:
        self.cp.cuda.Device(0).synchronize()

    def timer(self) -> tuple[Any, Any]:
        return self.cp.cuda.Event(), self.cp.cuda.Event()

    @staticmethod
    def record(event: Any) -> None:
        event.record()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(self.cp.cuda.get_elapsed_time(start, end))


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def bench_decode(lib: _Torch, batch: int, layers: int, steps: int) -> dict[str, float]:
    from kvcore import AllocationRequest, KvCacheManager
    blocks = batch * (-(-(steps * 2 + 2) // BS) + 1)
    mgr = KvCacheManager(_config(layers, blocks), backend=lib.name)
    handles = [mgr.allocate(AllocationRequest(request_id=f"b{i}", num_tokens=1))
               for i in range(batch)]
    one_k = lib.randn((1, HEADS, DIM))
    for h in handles:
        for layer in range(layers):
            h.write(layer, one_k, one_k)
    k, v = lib.randn((batch, HEADS, DIM)), lib.randn((batch, HEADS, DIM))

    def step() -> None:
        mapping = mgr.extend_batch(handles)
        for layer in range(layers):
            mgr.write_slots(layer, mapping, k, v)

    for _ in range(3):
        step()
    lib.sync()
    start, end = lib.timer()
    lib.record(start)
    for _ in range(steps):
        step()
    lib.record(end)
    seconds = lib.elapsed_ms(start, end) / 1e3 / steps
    nbytes = batch * layers * 2 * HEADS * DIM * 2
    # The same bytes as plain device copies, one per layer (K and V side by side).
    src = [lib.empty_device(batch * 2 * HEADS * DIM * 2) for _ in range(layers)]
    dst = [lib.empty_device(batch * 2 * HEADS * DIM * 2) for _ in range(layers)]
    for s, d in zip(src, dst):
        lib.copy(d, s)
    lib.sync()
    lib.record(start)
    for _ in range(steps):
        for s, d in zip(src, dst):
            lib.copy(d, s)
    lib.record(end)
    plain = lib.elapsed_ms(start, end) / 1e3 / steps
    return {"bytes": nbytes, "seconds": seconds, "gbps": _gbps(nbytes, seconds),
            "plain_seconds": plain, "plain_gbps": _gbps(nbytes, plain),
            "ratio": plain / seconds if seconds > 0 else 0.0}


def bench_swap(lib: _Torch, mib: int, repeats: int) -> dict[str, dict[str, float]]:
    from kvcore import AllocationRequest, KvCacheManager
    block_bytes = 2 * BS * HEADS * DIM * 2
    blocks = max(1, (mib << 20) // block_bytes)
    mgr = KvCacheManager(_config(1, blocks, blocks), backend=lib.name)
    n = blocks * BS
    h = mgr.allocate(AllocationRequest(request_id="swap", num_tokens=n))
    h.write(0, lib.randn((n, HEADS, DIM)), lib.randn((n, HEADS, DIM)))
    nbytes = blocks * block_bytes
    mgr.swap_out(h)
    mgr.swap_in(h)  # warm-up: pinned staging, kernels
    lib.sync()
    out_s, in_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mgr.swap_out(h)
        t1 = time.perf_counter()
        mgr.swap_in(h)
        t2 = time.perf_counter()
        out_s.append(t1 - t0)
        in_s.append(t2 - t1)
    host, dev = lib.empty_host(nbytes), lib.empty_device(nbytes)
    lib.copy(host, dev)
    lib.sync()
    d2h, h2d = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.copy(host, dev)
        lib.sync()
        t1 = time.perf_counter()
        lib.copy(dev, host)
        lib.sync()
        t2 = time.perf_counter()
        d2h.append(t1 - t0)
        h2d.append(t2 - t1)
    result = {}
    for name, ours, plain in (("swap_out", min(out_s), min(d2h)), ("swap_in", min(in_s), min(h2d))):
        result[name] = {"bytes": nbytes, "seconds": ours, "gbps": _gbps(nbytes, ours),
                        "plain_seconds": plain, "plain_gbps": _gbps(nbytes, plain),
                        "ratio": plain / ours if ours > 0 else 0.0}
    return result


def _libraries(names: list[str]) -> tuple[list[_Torch], dict[str, str]]:
    import kvcore
    libs, skipped = [], {}
    for name in names:
        try:
            kvcore.get_backend(name).check_device(kvcore.Device("cuda", 0))
            libs.append(_Torch() if name == "torch" else _Cupy())
        except Exception as exc:  # noqa: BLE001 - the reason is reported, not hidden
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return libs, skipped


def run(args: argparse.Namespace) -> dict[str, Any]:
    libs, skipped = _libraries(args.backends)
    results: dict[str, Any] = {"skipped": skipped, "backends": {}}
    for lib in libs:
        figures: dict[str, Any] = {"decode_write": bench_decode(lib, args.batch, args.layers,
                                                                args.steps)}
        figures.update(bench_swap(lib, args.swap_mib, args.repeats))
        results["backends"][lib.name] = figures
    return results


def format_lines(results: dict[str, Any]) -> list[str]:
    """Readable lines: each figure next to the plain copy of the same bytes."""
    lines = []
    labels = {"decode_write": "decode write", "swap_out": "swap out", "swap_in": "swap in"}
    for backend, figures in results.get("backends", {}).items():
        for key, label in labels.items():
            f = figures.get(key)
            if f is None:
                continue
            lines.append(f"{label:<12} {backend:<5} {f['gbps']:8.2f} GB/s   plain copy "
                         f"{f['plain_gbps']:8.2f} GB/s   ratio {f['ratio']:.2f} "
                         f"({f['bytes'] / 2**20:.1f} MiB, {f['seconds'] * 1e3:.2f} ms)")
    for backend, reason in results.get("skipped", {}).items():
        lines.append(f"{backend}: not benchmarked ({reason})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "cupy"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--swap-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    print("\n".join(format_lines(results)))
    return 0 if results["backends"] else 1


if __name__ == "__main__":
    sys.exit(main())
