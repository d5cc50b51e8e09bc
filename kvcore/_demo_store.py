"""``kvcore demo --store URL``: two processes share a prompt through a store.

This process allocates a 1,000-token prompt, writes its K/V for every layer and closes
its manager (which sends the completed blocks to the store).  A second process, started
afterwards with nothing but the store URL and the secret ``hash_key`` (passed in its
environment, never on the command line), allocates the same prompt: its manager finds
the blocks in the store, and it reads them back and compares them bit for bit with the
K/V the first process wrote (both derive them from the token ids).  The hit rate and
the timings are printed; the demo's keys are deleted from the store afterwards.

A fresh random ``hash_key`` and a namespace of the demo's own are used, so blocks of
earlier runs or of other deployments on the same store are never found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ._manager import KvCacheManager
from ._registry import get_backend
from .models import AllocationRequest, CacheConfig

__all__ = ["run_store_demo"]

_ENV_KEY = "KVCORE_DEMO_HASH_KEY"
_NAMESPACE = "kvcore-demo"
_PROMPT_TOKENS = 1000


def _config(url: str, hash_key: bytes, backend: Any) -> CacheConfig:
    return CacheConfig(num_layers=4, num_kv_heads=4, head_dim=32, dtype="float32",
                       block_size=16, num_blocks=128, device=backend.default_device(),
                       store=url, hash_key=hash_key, store_namespace=_NAMESPACE,
                       model_id="kvcore-demo-model")


def _prompt() -> list[int]:
    return np.random.default_rng(2024).integers(0, 32000, _PROMPT_TOKENS).tolist()


def _kv(tokens: list[int], layer: int, plane: int) -> np.ndarray:
    """K/V as a function of the prefix, position and layer, as a model's would be."""
    t = np.cumsum(np.asarray(tokens, dtype=np.float64))[:, None, None]
    grid = np.arange(4 * 32, dtype=np.float64).reshape(1, 4, 32)
    return np.sin(t * 1e-4 + grid * 0.1 + layer + 0.5 * plane).astype(np.float32)


def run_store_demo(url: str, backend: str | None = None) -> int:
    """Write the prompt here, read it back in a second process; 0 when it came back
    whole and bit-identical."""
    from .stores import StoreNamespace, new_hash_key, open_store, redact_url
    be = get_backend(backend)
    hash_key = new_hash_key()
    cfg = _config(url, hash_key, be)
    tokens = _prompt()
    print(f"kvcore demo --store {redact_url(url)} (backend {be.name}, namespace "
          f"{_NAMESPACE!r}, a fresh hash_key)")
    t0 = time.perf_counter()
    with KvCacheManager(cfg, backend=be) as mgr:
        h = mgr.allocate(AllocationRequest(request_id="writer", prompt_token_ids=tokens))
        for layer in range(cfg.num_layers):
            mgr.write(h, layer, be.from_numpy(_kv(tokens, layer, 0), cfg.dtype, cfg.device),
                      be.from_numpy(_kv(tokens, layer, 1), cfg.dtype, cfg.device))
        digests = mgr.block_digests(h)
        mgr.flush_store(60)
        sent = mgr.stats()
    print(f"  process 1 (pid {os.getpid()}): wrote a {len(tokens)}-token prompt, "
          f"{sent.store_blocks_written} blocks ({sent.store_bytes_stored / 2**20:.1f} MiB) "
          f"sent to the store, {sent.store_dropped_writes} dropped, "
          f"in {time.perf_counter() - t0:.2f} s")
    env = dict(os.environ, **{_ENV_KEY: hash_key.hex()})
    child = subprocess.run([sys.executable, "-m", "kvcore._demo_store", "read", url, be.name],
                           env=env, capture_output=True, text=True, timeout=300)
    try:
        result = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  process 2 failed (exit {child.returncode}): {child.stderr.strip()}",
              file=sys.stderr)
        return 1
    finally:
        try:  # the demo's keys: nobody else can ever find them (a fresh hash_key)
            ns = StoreNamespace.from_config(cfg)
            with open_store(url) as store:
                store.delete(ns.keys(digests))
        except Exception as exc:  # noqa: BLE001 - cleaning up is best effort
            print(f"  (could not delete the demo's keys: {type(exc).__name__}: {exc})")
    asked = result["store_hits"] + result["store_misses"]
    print(f"  process 2 (pid {result['pid']}): allocated the same prompt; "
          f"{result['cached_tokens']} of {len(tokens)} tokens served from the store "
          f"({result['store_hits']} blocks, hit rate {result['store_hits'] / max(asked, 1):.0%}"
          f" of the {asked} blocks asked; the last prompt token is always computed) in "
          f"{result['allocate_ms']:.1f} ms")
    print(f"  read back every layer: "
          f"{'bit-identical' if result['bit_identical'] else 'DIFFERENT'} to what process "
          f"1 wrote; store errors {result['store_errors']}")
    ok = result["bit_identical"] and result["store_misses"] == 0 and result["store_hits"] > 0
    print("kvcore demo --store: OK" if ok else "kvcore demo --store: FAILED",
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _read(url: str, backend: str) -> int:
    """The second process: allocate the prompt, check what the store served."""
    be = get_backend(backend)
    cfg = _config(url, bytes.fromhex(os.environ[_ENV_KEY]), be)
    tokens = _prompt()
    with KvCacheManager(cfg, backend=be) as mgr:
        t0 = time.perf_counter()
        h = mgr.allocate(AllocationRequest(request_id="reader", prompt_token_ids=tokens))
        allocate_ms = (time.perf_counter() - t0) * 1e3
        cached = h.num_cached_tokens()
        same = cached > 0
        for layer in range(cfg.num_layers):
            for plane, ref in enumerate(h.kv_cache(layer) or ()):
                got = be.to_numpy(ref.native)
                same = same and got.tobytes() == _kv(tokens, layer, plane)[:cached].tobytes()
        s = mgr.stats()
    print(json.dumps({"pid": os.getpid(), "cached_tokens": cached, "store_hits": s.store_hits,
                      "store_misses": s.store_misses, "store_errors": s.store_errors,
                      "bit_identical": bool(same), "allocate_ms": allocate_ms}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "read":
        sys.exit("usage: python -m kvcore._demo_store read URL BACKEND (started by "
                 "kvcore demo --store URL)")
    sys.exit(_read(sys.argv[2], sys.argv[3]))
