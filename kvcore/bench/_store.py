"""The ``store`` workload: sharing blocks through Redis (and a directory), each figure
against plain redis-py / plain file I/O moving the same bytes in the same run.

A prefix of ``max_prompt`` tokens (2,048 by default: 128 blocks of 16 tokens, each
block ``layers`` x ``[2, block_size, kv_heads, head_dim]``) is written and read:

* ``write_GBps``: :meth:`StoreConnector.offer` of every block + ``flush`` (encode,
  the existence check, pipelined ``SET`` in batches, all in the write-behind thread)
  against the faster of a redis-py pipeline of ``SET`` and one ``SET`` per value, of
  the already-encoded values, with redis-py's defaults.  Target >= 0.8x.
* ``read_GBps``: :meth:`StoreConnector.fetch_run` of every block (windowed ``MGET``,
  every value checked and decoded) against the fastest of redis-py ``MGET``, a
  pipeline of ``GET`` and one ``GET`` per key.  Target >= 0.8x.  ``details`` give
  every plain variant.
* ``hit_latency``: ``fetch_run`` of one block against one redis-py ``GET``.
* ``chunk16_read`` / ``chunk16_write``: the same bytes as 16-block values (LMCache's
  chunking) against single-block values through the same Store, to justify one value
  per block.
* ``disk_write_GBps`` / ``disk_read_GBps``: the connector on a ``file://`` store
  against plain ``open().write()`` / ``read()`` of the same bytes.
* ``load_prefix`` (pre-integration): ``fetch_run`` + ``KvCacheManager.write`` of the
  blocks into a freshly allocated sequence, against writing the same K/V fresh; once
  the manager reads through at ``allocate`` this becomes the allocate-with-hits path.
* ``chain_keys_per_block`` / ``step_keys_per_block``: the keyed BLAKE2b chain key of
  a block against the in-process 64-bit prefix key, for a prompt's chain and for a
  decode step's completed blocks; ``offer_per_block``: handing a completed block to the
  write-behind queue.  Per-block costs an engine pays on its own thread.

Through a manager that owns a connector (:mod:`kvcore.bench._store_manager`): the
decode-step overhead with a store attached (issue target 1.1x), loading a prefix
through ``allocate`` against writing it fresh, and a one-block hit through
``allocate``.

Redis: ``--store-url redis://...`` (or ``redis+cluster://``), else a throwaway
``redis-server`` started on a free loopback port (``kv_redis.testing``), else the
workload is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import Backend
from .._device import DType
from .._manager import KvCacheManager
from ..models import AllocationRequest, CacheConfig
from ..stores import (StoreConnector, StoreNamespace, block_layout, chain_keys, new_hash_key,
                      open_store, redact_url)
from ..stores._codec import BlockCodec
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._store_manager import measure_with_manager
from ._timing import Progress, clock, median, spread

__all__ = ["StoreUnavailable", "run_store"]

_TARGET = ">= 0.8x plain redis-py"  # the fastest plain variant measured
_GB = 1e9


class StoreUnavailable(RuntimeError):
    """No Redis to measure against (the workload is skipped with this reason)."""


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    """``url``, or a throwaway redis-server's URL for the duration."""
    if url:
        yield url
        return
    try:
        from kv_redis.testing import INSTALL_HINT, RedisServer, find_redis_server
    except ImportError as exc:
        raise StoreUnavailable(f'kvcore-redis is not installed ({exc}): pip install '
                               f'"kvcore[redis]", or pass --store-url') from None
    if find_redis_server() is None:
        raise StoreUnavailable(f"no redis-server to start ({INSTALL_HINT}), and no --store-url")
    with tempfile.TemporaryDirectory(prefix="kvcore-bench-redis-") as tmp, \
            RedisServer(tmp) as server:
        yield server.url


def _config(backend: Backend, p: BenchParams, blocks: int) -> CacheConfig:
    return CacheConfig(num_layers=p.layers, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                       dtype=DType.parse(p.dtype), block_size=p.block_size,
                       num_blocks=2 * blocks + 2, device=backend.default_device(),
                       enable_prefix_caching=False)


def _timed(fn: Callable[[], Any]) -> float:
    start = clock()
    fn()
    return clock() - start


def _pairs(ours: Callable[[], None], base: Callable[[], None], repeats: int,
           before: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Interleaved timings of ``ours`` and ``base`` (one warm-up each, untimed)."""
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats + 1):
        before()
        t_ours = _timed(ours)
        before()
        t_base = _timed(base)
        if i:
            a.append(t_ours)
            b.append(t_base)
    return a, b


def _bandwidth(name: str, nbytes: int, ours: list[float], base: list[float], label: str,
               target: str | None = _TARGET) -> Figure:
    value = nbytes / median(ours) / _GB
    baseline = nbytes / median(base) / _GB
    ratio = value / baseline
    return Figure(name=name, value=value, unit="GB/s", baseline=baseline, baseline_label=label,
                  ratio=ratio, ratio_meaning="kvcore / baseline (higher is better)",
                  target=target, met=None if target is None else ratio >= 0.8)


def _latency(name: str, ours: list[float], base: list[float], label: str) -> Figure:
    value, baseline = median(ours), median(base)
    return Figure(name=name, value=value, unit="s", baseline=baseline, baseline_label=label,
                  ratio=value / baseline, ratio_meaning="kvcore / baseline (lower is better)")


def run_store(backend: Backend, p: BenchParams, progress: Progress,
              url: str | None = None) -> WorkloadResult:
    """The whole ``store`` workload (raises :class:`StoreUnavailable` without Redis)."""
    began = clock()
    with redis_url(url) as target:
        result = _run(backend, p, progress, target)
    result.wall_s = clock() - began
    return result


def _run(backend: Backend, p: BenchParams, progress: Progress, url: str) -> WorkloadResult:
    t0 = clock()
    n = max(1, p.max_prompt // p.block_size)
    cfg = _config(backend, p, n)
    layout = block_layout(cfg)
    rng = np.random.default_rng(p.seed)
    # Host blocks as the connector takes them (bfloat16 as raw 16-bit patterns).
    kv = [[rng.standard_normal(s.shape, dtype=np.float32)
           .astype(np.float16 if s.dtype.itemsize == 2 else s.dtype).view(s.dtype)
           for s in layout] for _ in range(n)]
    tokens = rng.integers(0, 32000, (n, p.block_size))
    hash_key = new_hash_key()
    ns = StoreNamespace.from_config(cfg, namespace="bench")
    block_bytes = sum(a.nbytes for a in kv[0])
    total = n * block_bytes
    result = WorkloadResult(workload="store", backend=backend.name)
    result.details.update({"store": redact_url(url), "blocks": n, "block_bytes": block_bytes,
                           "prefix_tokens": n * p.block_size,
                           "bytes_per_token": block_bytes // p.block_size})
    store = open_store(url, timeout=30, connect_timeout=5)
    conn = StoreConnector(store, ns, layout, queue_blocks=4 * n,
                          queue_bytes=max(256 << 20, 4 * total), close_store=False)
    codec = BlockCodec(ns.fingerprint, layout)
    client = _raw_client(store)
    result.alloc_s = clock() - t0
    rounds = [0]

    def fresh_digests() -> list[bytes]:
        rounds[0] += 1
        return chain_keys(None, tokens, f"round-{rounds[0]}", hash_key)

    try:
        progress(f"store/{backend.name}: write {n} blocks of {block_bytes} B to {redact_url(url)}")
        # --- write: connector (offer + flush) vs the best plain redis-py write --------
        ours_w: list[float] = []
        plain: dict[str, list[float]] = {"pipeline SET": [], "SET per value": []}
        for i in range(p.repeats + 1):
            digests = fresh_digests()
            t_ours = _timed(lambda: (conn.offer(list(zip(digests, kv))), conn.flush()))
            values = [codec.encode(d, b) for d, b in zip(digests, kv)]
            used = []
            for name, write in (("pipeline SET", _pipeline_set), ("SET per value", _set_each)):
                keys = ns.keys(fresh_digests())
                used += keys
                elapsed = _timed(lambda: write(client, keys, values))
                if i:
                    plain[name].append(elapsed)
            if i:
                ours_w.append(t_ours)
            client.delete(*used)
        best = min(plain, key=lambda k: median(plain[k]))
        result.add(_bandwidth("write_GBps", total, ours_w, plain[best],
                              f"the fastest plain redis-py write of the same values: {best} "
                              f"({', '.join(plain)} measured)"))
        result.details["write_plain_GBps"] = {k: total / median(v) / _GB for k, v in plain.items()}
        written = ns.keys(digests)

        # --- read: fetch_run (checks + decode) vs the best plain redis-py read ------------
        progress(f"store/{backend.name}: read {n} blocks")
        reads: dict[str, Callable[[], Any]] = {
            "MGET": lambda: client.mget(written),
            "pipeline GET": lambda: _pipeline_get(client, written),
            "GET per key": lambda: [client.get(k) for k in written]}
        ours_r: list[float] = []
        plain_r: dict[str, list[float]] = {k: [] for k in reads}
        for i in range(p.repeats + 1):
            t_ours = _timed(lambda: _expect(len(conn.fetch_run(digests)), n))
            times = {name: _timed(read) for name, read in reads.items()}
            if i:
                ours_r.append(t_ours)
                for name, t in times.items():
                    plain_r[name].append(t)
        best = min(plain_r, key=lambda k: median(plain_r[k]))
        result.add(_bandwidth("read_GBps", total, ours_r, plain_r[best],
                              f"the fastest plain redis-py read of the same keys: {best} "
                              f"({', '.join(reads)} measured)"))
        result.details["read_plain_GBps"] = {k: total / median(v) / _GB for k, v in plain_r.items()}
        one_ours, one_base = _pairs(lambda: conn.fetch_run(digests[:1]),
                                    lambda: client.get(written[0]), max(p.repeats, 50))
        result.add(_latency("hit_latency", one_ours, one_base,
                            "redis-py GET of one block's value"))
        result.details["read_spread_s"] = spread(ours_r)

        # --- one value per block vs chunks of 16 blocks (same bytes, same Store) ----------
        progress(f"store/{backend.name}: single-block values vs 16-block chunks")
        _chunks(result, store, codec, ns, kv, digests, p.repeats)

        # --- a directory ----------------------------------------------------------------------
        progress(f"store/{backend.name}: the same through file://")
        _disk(result, ns, layout, kv, fresh_digests, codec, p.repeats, total)

        # --- load a prefix vs write it fresh (pre-integration proxy) -------------------
        progress(f"store/{backend.name}: load a {n * p.block_size}-token prefix vs write it")
        _load_vs_write(result, backend, cfg, conn, digests, kv, p.repeats)

        # --- through the manager, once it owns a connector -------------------------------
        try:
            measure_with_manager(result, backend, p, url)
        except Exception as exc:  # noqa: BLE001 - an integration problem must not lose the rest
            result.details["with_manager"] = f"failed: {type(exc).__name__}: {exc}"

        # --- per-block costs on the engine's thread --------------------------------------
        _key_costs(result, tokens, hash_key, p)
        # offer() as the engine's thread sees it, the write-behind thread running.
        offer_s = []
        for _ in range(p.repeats + 1):
            digests = fresh_digests()
            offer_s.append(_timed(lambda: [conn.offer([(d, b)]) for d, b in zip(digests, kv)])
                           / n)
            conn.flush()
        result.add(Figure(name="offer_per_block", value=median(offer_s[1:]), unit="s"))
        result.details["connector_stats"] = conn.stats().model_dump(mode="json")
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            _purge(client, ns)
        client.close()
        store.close()
    return result


def _key_costs(result: WorkloadResult, tokens: np.ndarray, hash_key: bytes,
               p: BenchParams) -> None:
    """Both block keys, per block: the keyed BLAKE2b chain key that names a block outside
    the process, against the in-process 64-bit prefix key; for a prompt's chain (as
    ``allocate`` computes them) and for a decode step's completed blocks (one per
    sequence, as a step computes them)."""
    from .._chain_hash import ChainHasher
    from ..stores._keys import ChainKeyer
    n = tokens.shape[0]
    rows = np.ascontiguousarray(tokens, dtype=np.int32)
    hasher, keyer = ChainHasher(p.block_size, p.seed), ChainKeyer(hash_key)
    reps = range(max(p.repeats, 5) + 1)
    crypto = [_timed(lambda: chain_keys(None, rows, None, hash_key)) / n for _ in reps][1:]
    local = [_timed(lambda: hasher.keys(rows, 1)) / n for _ in reps][1:]
    result.add(Figure(name="chain_keys_per_block", value=median(crypto), unit="s",
                      baseline=median(local),
                      baseline_label=f"the in-process 64-bit prefix key of the same {n} "
                                     "blocks (ChainHasher.keys, vectorised)",
                      ratio=median(crypto) / median(local),
                      ratio_meaning="keyed BLAKE2b / in-process key, per block of a prompt"))
    parents = np.arange(n, dtype=np.uint64)
    roots = [bytes(16)] * n
    extras = [b""] * n
    crypto = [_timed(lambda: keyer.steps(roots, rows, extras)) / n for _ in reps][1:]
    local = [_timed(lambda: hasher.step(parents, rows)) / n for _ in reps][1:]
    result.add(Figure(name="step_keys_per_block", value=median(crypto), unit="s",
                      baseline=median(local),
                      baseline_label=f"the in-process key of {n} sequences' completed blocks "
                                     "in one step (ChainHasher.step)",
                      ratio=median(crypto) / median(local),
                      ratio_meaning="keyed BLAKE2b / in-process key, per block of a decode "
                                    "step"))


def _pipeline_set(client: Any, keys: list[str], values: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for k, v in zip(keys, values):
        pipe.set(k, v)
    pipe.execute()


def _set_each(client: Any, keys: list[str], values: list[bytes]) -> None:
    for k, v in zip(keys, values):
        client.set(k, v)


def _pipeline_get(client: Any, keys: list[str]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    return pipe.execute()


def _expect(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"the store returned {got} of {want} blocks during the bench")


def _raw_client(store: Any) -> Any:
    """A plain redis-py client for the baselines: the store's server and settings, but
    redis-py's own defaults for everything else (its command packer included)."""
    import redis
    own = getattr(store, "client", None)
    pool = getattr(own, "connection_pool", None)
    if pool is None:
        raise StoreUnavailable(f"{store.url} is not a single Redis server; the store workload "
                               "compares against redis-py on one server")
    kwargs = dict(pool.connection_kwargs)
    kwargs.pop("command_packer", None)
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **kwargs))


def _purge(client: Any, ns: StoreNamespace) -> None:
    keys = list(client.scan_iter(match=ns.prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])


def _chunks(result: WorkloadResult, store: Any, codec: BlockCodec, ns: StoreNamespace,
            kv: list[list[np.ndarray]], digests: list[bytes], repeats: int) -> None:
    n = len(kv)
    size = 16 if n >= 16 else n
    singles = [(k, codec.encode(d, b)) for k, d, b in zip(ns.keys(digests), digests, kv)]
    chunk_codec = BlockCodec(ns.fingerprint, [(
        (s.shape[0], s.shape[1] * size, *s.shape[2:]), s.dtype, s.label) for s in codec.specs])
    chunks = []
    for start in range(0, n - size + 1, size):
        arrays = [np.concatenate([kv[b][layer] for b in range(start, start + size)], axis=1)
                  for layer in range(len(kv[0]))]
        chunks.append((ns.key(digests[start + size - 1]) + ".c16",
                       chunk_codec.encode(digests[start + size - 1], arrays)))
    single_keys = [k for k, _ in singles]
    chunk_keys = [k for k, _ in chunks]
    w_single, w_chunk = _pairs(lambda: store.put(singles), lambda: store.put(chunks), repeats)
    r_single, r_chunk = _pairs(lambda: store.get(single_keys), lambda: store.get(chunk_keys),
                               repeats)
    nbytes = sum(len(v) for _, v in singles)
    for name, single, chunk in (("chunk16_write", w_single, w_chunk),
                                ("chunk16_read", r_single, r_chunk)):
        result.add(_bandwidth(name, nbytes, single, chunk,
                              f"the same bytes as {size}-block values through the same Store",
                              target=None))
    store.delete(chunk_keys)


def _disk(result: WorkloadResult, ns: StoreNamespace, layout: list[Any],
          kv: list[list[np.ndarray]], fresh: Callable[[], list[bytes]], codec: BlockCodec,
          repeats: int, total: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kvcore-bench-disk-") as tmp:
        disk = open_store(f"file://{tmp}/store")
        conn = StoreConnector(disk, ns, layout, queue_blocks=4 * len(kv),
                              queue_bytes=max(256 << 20, 4 * total))
        plain = Path(tmp) / "plain"
        plain.mkdir()
        ours_w, base_w = [], []
        for i in range(repeats + 1):
            digests = fresh()
            t_ours = _timed(lambda: (conn.offer(list(zip(digests, kv))), conn.flush()))
            values = [codec.encode(d, b) for d, b in zip(digests, kv)]

            def write_files() -> None:
                for j, v in enumerate(values):
                    with open(plain / f"{i}-{j}", "wb") as fh:
                        fh.write(v)

            t_base = _timed(write_files)
            if i:
                ours_w.append(t_ours)
                base_w.append(t_base)
        result.add(_bandwidth("disk_write_GBps", total, ours_w, base_w,
                              "open(path, 'wb').write(value) per block, same bytes",
                              target=None))
        files = sorted(plain.iterdir())[-len(kv):]

        def read_files() -> None:
            for f in files:
                with open(f, "rb") as fh:
                    fh.read()

        ours_r, base_r = _pairs(lambda: _expect(len(conn.fetch_run(digests)), len(kv)),
                                read_files, repeats)
        result.add(_bandwidth("disk_read_GBps", total, ours_r, base_r,
                              "open(path, 'rb').read() per block, same bytes", target=None))
        conn.close()


def _load_vs_write(result: WorkloadResult, backend: Backend, cfg: CacheConfig,
                   conn: StoreConnector, digests: list[bytes], kv: list[list[np.ndarray]],
                   repeats: int) -> None:
    """Pre-integration: what allocate-with-store-hits will do (fetch the run, copy it
    into fresh blocks), against writing the same K/V into fresh blocks."""
    mgr = KvCacheManager(cfg, backend=backend)
    n, bs = len(kv), cfg.block_size
    tokens = n * bs
    dtype, device = cfg.dtype, cfg.device
    host = [np.stack([block[layer] for block in kv], axis=1).reshape(
        2, tokens, cfg.num_kv_heads, cfg.head_dim) for layer in range(cfg.num_layers)]
    fresh = [(backend.from_numpy(_as_float(h[0], dtype), dtype, device),
              backend.from_numpy(_as_float(h[1], dtype), dtype, device)) for h in host]
    serial = [0]

    def allocate() -> Any:
        serial[0] += 1
        return mgr.allocate(AllocationRequest(request_id=f"r{serial[0]}", num_tokens=tokens))

    def load() -> None:
        h = allocate()
        run = conn.fetch_run(digests)
        _expect(len(run), n)
        for layer in range(cfg.num_layers):
            kv_layer = np.stack([block[layer] for block in run], axis=1).reshape(
                2, tokens, cfg.num_kv_heads, cfg.head_dim)
            mgr.write(h, layer, backend.from_numpy(_as_float(kv_layer[0], dtype), dtype, device),
                      backend.from_numpy(_as_float(kv_layer[1], dtype), dtype, device))
        mgr.deallocate(h)

    def write() -> None:
        h = allocate()
        for layer, (k, v) in enumerate(fresh):
            mgr.write(h, layer, k, v)
        mgr.deallocate(h)

    ours, base = _pairs(load, write, repeats)
    result.add(_latency("load_prefix", ours, base,
                        f"KvCacheManager.write of the same {tokens} tokens into fresh blocks "
                        "(pre-integration: load = fetch_run + write)"))


def _as_float(array: np.ndarray, dtype: DType) -> np.ndarray:
    """Host K/V as the float type ``from_numpy`` takes (bfloat16 travels as raw bits)."""
    if dtype is DType.bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array
