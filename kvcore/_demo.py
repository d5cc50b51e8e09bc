"""``kvcore demo``: a small real workload whose every read is checked.

It allocates a few sequences (two of them sharing a prompt prefix), writes K/V for
every layer, runs decode steps as one batched write per layer, forks one sequence,
and compares everything it reads back with the values it wrote.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._backend import Backend
from ._manager import KvCacheManager
from ._registry import get_backend
from .models import AllocationRequest, CacheConfig

__all__ = ["run_demo"]

#: The one command that installs what ``kvcore demo --generate`` needs.
GENERATE_HINT = 'pip install "kvcore[transformers]"'


def run_demo(backend: str | None = None, *, generate: bool = False) -> int:
    """Run the demo on ``backend`` (``None``: the default rule of :func:`get_backend`);
    returns the exit status (0: every check passed, 1: a check failed, 2: ``generate``
    cannot run here)."""
    if generate:
        try:
            from .integrations._demo_generate import run_generation_demo
        except ImportError as exc:
            print(f"kvcore demo --generate needs torch and transformers ({exc}): "
                  f"{GENERATE_HINT}", file=sys.stderr)
            return 2
        return run_generation_demo(backend)

    be = get_backend(backend)
    cfg = CacheConfig(num_layers=4, num_kv_heads=4, head_dim=32, dtype="float32",
                      block_size=16, num_blocks=256, device=be.default_device())
    mgr = KvCacheManager(cfg, backend=be)
    rng = np.random.default_rng(0)
    shape = (cfg.num_kv_heads, cfg.head_dim)
    print(f"backend {be.name}: {mgr}")

    system = rng.integers(0, 32000, 48).tolist()  # a shared 48-token system prompt
    prompts = {"alpha": system + rng.integers(0, 32000, 21).tolist(),
               "beta": system + rng.integers(0, 32000, 7).tolist(),
               "gamma": rng.integers(0, 32000, 33).tolist()}
    # The dense truth every read is compared with: per sequence, per layer, K and V.
    truth: dict[str, list[list[np.ndarray]]] = {}
    handles = {}
    for rid, tokens in prompts.items():
        h = mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=tokens))
        handles[rid] = h
        cached = h.num_cached_tokens()
        truth[rid] = []
        for layer in range(cfg.num_layers):
            # K/V are a pure function of (token, position, layer) here, as in a model,
            # so a prefix served from the cache holds exactly what prefill would write.
            k = _fake_kv(tokens, layer, 0, shape)
            v = _fake_kv(tokens, layer, 1, shape)
            if cached < len(tokens):
                mgr.write(h, layer, _as_backend(be, k[cached:], cfg),
                          _as_backend(be, v[cached:], cfg), start=cached)
            truth[rid].append([k, v])
        print(f"  allocated {rid:<6} {len(tokens):3d} prompt tokens, "
              f"{cached:3d} served from the prefix cache")

    steps = 24
    for step in range(steps):
        order = list(handles)
        slots = mgr.extend_batch([handles[r] for r in order], 1)
        for layer in range(cfg.num_layers):
            ks = rng.standard_normal((len(order), *shape)).astype(np.float32)
            vs = rng.standard_normal((len(order), *shape)).astype(np.float32)
            mgr.write_slots(layer, slots, _as_backend(be, ks, cfg), _as_backend(be, vs, cfg))
            for i, rid in enumerate(order):
                truth[rid][layer][0] = np.concatenate([truth[rid][layer][0], ks[i:i + 1]])
                truth[rid][layer][1] = np.concatenate([truth[rid][layer][1], vs[i:i + 1]])
    print(f"  decoded {steps} steps for {len(handles)} sequences (one batched write per layer)")

    child = mgr.fork(handles["alpha"], "alpha/beam-1")
    mgr.extend(child, 1)
    for layer in range(cfg.num_layers):
        k = np.full((1, *shape), 7.0, np.float32)
        mgr.write(child, layer, _as_backend(be, k, cfg), _as_backend(be, -k, cfg))
    handles["alpha/beam-1"] = child
    truth["alpha/beam-1"] = [[np.concatenate([kv[0], np.full((1, *shape), 7.0, np.float32)]),
                              np.concatenate([kv[1], np.full((1, *shape), -7.0, np.float32)])]
                             for kv in truth["alpha"]]
    print(f"  forked alpha -> alpha/beam-1 and wrote one token into the child "
          f"({mgr.stats().copy_on_write_copies} block copied on write)")

    failures = 0
    for rid, h in handles.items():
        for layer in range(cfg.num_layers):
            pair = h.kv_cache(layer)
            got = [be.to_numpy(ref.native) for ref in pair] if pair else []
            want = truth[rid][layer]
            if not got or any(g.shape != w.shape or not np.array_equal(g, w)
                              for g, w in zip(got, want)):
                failures += 1
                print(f"  MISMATCH {rid} layer {layer}", file=sys.stderr)
    mgr.check_invariants()
    checked = len(handles) * cfg.num_layers * 2
    print(f"  read back {checked} K/V arrays in logical order: "
          f"{'all match' if not failures else f'{failures} layers differ'}")
    for rid in list(handles):
        mgr.deallocate(rid)
    mgr.check_invariants()
    s = mgr.stats()
    print(f"  stats: {s.total_blocks} blocks, {s.used_blocks} used, {s.cached_blocks} cached "
          f"for reuse, prefix hit rate {s.prefix_cache_hit_rate:.0%}, "
          f"{s.allocations} allocations, {s.allocation_failures} failures")
    if failures:
        print("kvcore demo: FAILED", file=sys.stderr)
        return 1
    print("kvcore demo: OK")
    return 0


def _fake_kv(tokens: list[int], layer: int, kv: int, shape: tuple[int, int]) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.float32)[:, None, None]
    pos = np.arange(len(tokens), dtype=np.float32)[:, None, None]
    grid = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(1, *shape)
    return np.sin(t * 0.001 + pos * 0.01 + grid * 0.1 + layer + 0.5 * kv).astype(np.float32)


def _as_backend(be: Backend, array: np.ndarray, cfg: CacheConfig) -> Any:
    return be.from_numpy(array, cfg.dtype, cfg.device)
