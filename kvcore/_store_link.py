"""StoreLink: the manager's part beyond the process: block digests, a store's
write-behind and read-through.

A manager whose config has a ``store`` (or ``crypto_block_keys``) owns one, as the
coordinator's ``link``:

* **Digests** (:mod:`kvcore._chain_digests`): every recorded full block gets its keyed
  BLAKE2b chain key.
* **Write-behind**: when blocks become complete (every layer written, through any
  write path) and their digests are known, their K/V go to the host (one gather per
  plane per layer for the whole batch of blocks, never per token or per block) and
  to :meth:`StoreConnector.offer_planes`, which queues them and returns.  Blocks loaded from
  the store are not offered again.
* **Read-through**: :meth:`prepare` runs in ``allocate`` after the local prefix hits
  and the room check: one ``fetch_run`` for the prompt's next full blocks (up to the
  last-prompt-token rule), nothing changed yet; :meth:`committed` runs after the
  allocation is committed: the blocks found are copied into the fresh blocks the plan
  already holds for them (room for them is part of the plan), recorded in the prefix
  index like any written block, and counted as store hits.  A store fault is a miss
  (``strict``: ``allocate`` raises before changing anything).
* **Lifetime**: :meth:`close` sends what is queued (bounded by ``close_timeout``) and
  closes the store.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._backend import Backend
from ._chain_digests import ChainDigests
from ._device import DType
from ._persist import host_bits
from .errors import StoreConfigError, StoreError, UnsupportedError
from .models import AllocationRequest, CacheConfig

if TYPE_CHECKING:
    from ._coordinator import Coordinator, GroupParts
    from ._growth import AllocationPlan
    from .stores import StoreConnector, StoreStats

__all__ = ["StoreLink", "open_link"]

#: ``store_options`` that configure the connector (the rest go to the store plugin).
CONNECTOR_OPTIONS = ("strict", "queue_blocks", "queue_bytes", "batch_blocks", "batch_bytes",
                     "failure_threshold", "cooldown_s", "skip_existing", "delete_corrupt",
                     "read_window")
#: ``store_options`` the link itself reads.
LINK_OPTIONS = ("authenticate", "close_timeout")
_FLAGS = ("strict", "skip_existing", "delete_corrupt", "authenticate")
_MAC_PERSON = b"kvcore.mac.v1"


class Fetched(NamedTuple):
    """What :meth:`StoreLink.prepare` found: the digests of the prompt's full blocks,
    and the decoded blocks of the run after the local hits (one array per layer)."""

    digests: np.ndarray
    run: list[list[np.ndarray]]


def open_link(co: Coordinator, config: CacheConfig, backend: Backend) -> StoreLink | None:
    """The link a config asks for (``None``: no store, no crypto_block_keys); opening a
    store contacts nothing."""
    if config.store is None and not config.crypto_block_keys:
        return None
    if config.store is not None and config.layer_groups:
        raise UnsupportedError(
            "store: a store shares blocks of caches whose layers share one layout, and "
            "this config has layer_groups (sliding, latent or cross-attention layers, or "
            "several head shapes); a block of several groups has no store format yet. "
            "Use a config without layer_groups, or no store")
    if config.hash_key is not None:
        hash_key = config.hash_key.get_secret_value()
    else:  # crypto_block_keys alone: a secret of this manager's, shared with nobody
        from .stores import new_hash_key
        hash_key = new_hash_key()
    return StoreLink(co, config, backend, hash_key)


def _split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any],
                                                            dict[str, Any]]:
    """``store_options`` as (connector, link, store) keywords, with the flags checked."""
    connector: dict[str, Any] = {}
    link: dict[str, Any] = {}
    store: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in _FLAGS and not isinstance(value, bool):
            raise StoreConfigError(f"store option {name}={value!r} must be True or False")
        if name in CONNECTOR_OPTIONS:
            connector[name] = value
        elif name in LINK_OPTIONS:
            link[name] = value
        else:
            store[name] = value
    timeout = link.get("close_timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise StoreConfigError(f"store option close_timeout={timeout!r} must be a number of "
                               "seconds >= 0")
    return connector, link, store


class StoreLink:
    """Digests, write-behind and read-through for one manager (see the module
    docstring).  Called under the manager's lock; only the copies of deferred blocks
    run on the connector's writer thread (guarded by ``_pools_lock`` against the pools
    being released)."""

    def __init__(self, co: Coordinator, config: CacheConfig, backend: Backend,
                 hash_key: bytes) -> None:
        self._co = co
        self._config = config
        self._backend = backend
        self.digests = ChainDigests(co, hash_key, per_block=config.store is not None)
        self.connector: StoreConnector | None = None
        self._close_timeout = 5.0
        #: Blocks loaded from the store, blocks asked for and not served, and the
        #: offers dropped before reaching the connector (breaker open, a refused offer).
        self.hits = 0
        self.misses = 0
        self.dropped = 0
        self.write_error: StoreError | None = None
        self._deferred = False
        if config.store is None:
            return
        connector_kw, link_kw, store_kw = _split_options(config.store_options)
        self._close_timeout = float(link_kw.get("close_timeout", 5.0))
        if link_kw.get("authenticate", False):
            connector_kw["mac_key"] = hashlib.blake2b(b"", digest_size=32, key=hash_key,
                                                      person=_MAC_PERSON).digest()
        from .stores import BreakerState, StoreConnector
        self._breaker_open = BreakerState.open
        self.connector = StoreConnector.open(config.store, config, store_options=store_kw,
                                             **connector_kw)
        self._dtype = config.dtype
        # Pools in host memory that change in place can be read by the writer thread.
        self._deferred = (config.device.type == "cpu"
                          and backend.capabilities().mutable_pools)
        self._pools_lock = threading.Lock()
        self._pools_gone = False
        self._block_bytes = sum(spec.nbytes for spec in self.connector.layout)
        layout = self.connector.layout[0]
        self._host_dtype = layout.dtype
        _, self._bs, self._heads, self._dim = layout.shape
        self._offsets = np.arange(config.block_size, dtype=np.int64)

    # --- BlockLink: recording ------------------------------------------------------

    def recorded(self, row: int, first: int, stop: int, keys: np.ndarray) -> None:
        self.digests.recorded(row, first, stop, keys)

    def recorded_step(self, rows: np.ndarray, logical: np.ndarray, tokens: np.ndarray,
                      keys: np.ndarray) -> None:
        self.digests.recorded_step(rows, logical, tokens, keys)

    # --- write-behind ---------------------------------------------------------------

    def completed(self, group: GroupParts, blocks: np.ndarray) -> None:
        """``blocks`` just became complete: offer those whose digests are known.

        With pools in host memory, blocks the prefix index serves (registered and
        complete, hence never written in place: every write path copies them first)
        are copied by the writer thread, which then proves each unchanged (still
        served, same generation and key: a block freed, evicted, truncated or reset
        meanwhile moved its generation first) and drops any that is not.  Other blocks
        are copied here, now."""
        conn = self.connector
        if conn is None:
            return
        blocks = blocks[self.digests.known(blocks)]
        if not blocks.size:
            return
        if conn.breaker_state is self._breaker_open:
            self.dropped += blocks.size  # the store is left alone: no copy for nothing
            return
        try:
            if self._deferred:
                later = group.prefix.servable(blocks)
                if later.any():
                    self._offer_later(conn, group, blocks[later])
                    blocks = blocks[~later]
                    if not blocks.size:
                        return
            planes = self._host_planes(group, blocks)
            conn.offer_planes(self._digest_list(blocks), planes)
        except StoreError as exc:  # strict: an earlier background write failed
            self.dropped += blocks.size
            if self.write_error is None:
                self.write_error = exc

    def _digest_list(self, blocks: np.ndarray) -> list[bytes]:
        raw = self.digests.block_digest[blocks].tobytes()
        return [raw[i:i + 16] for i in range(0, len(raw), 16)]

    def _offer_later(self, conn: StoreConnector, group: GroupParts, blocks: np.ndarray) -> None:
        prefix = group.prefix
        gens, keys = prefix.gen[blocks].copy(), prefix.key[blocks].copy()

        def produce() -> list[list[np.ndarray] | None]:  # on the writer thread
            with self._pools_lock:
                if self._pools_gone:
                    return [None] * blocks.size
                planes = self._host_planes(group, blocks)
                # Read after the copy: a change to a block's memory is preceded, on the
                # engine's thread, by moving its generation (or un-serving it).
                same = (prefix.servable(blocks) & (prefix.gen[blocks] == gens)
                        & (prefix.key[blocks] == keys))
            return [[plane[i] for plane in planes] if ok else None
                    for i, ok in enumerate(same.tolist())]

        conn.offer_lazy(self._digest_list(blocks), self._block_bytes, produce)

    def _host_planes(self, group: GroupParts, blocks: np.ndarray) -> list[np.ndarray]:
        """K and V of every layer of ``blocks``, ``[blocks, block_size, heads, dim]`` on
        the host: one gather per plane per layer for the whole batch, and nothing
        else on this thread (a numpy gather is used as it is)."""
        store, bs = group.store, self._bs
        index = store.index((blocks[:, None] * bs + self._offsets).reshape(-1))
        shape = (blocks.size, bs, self._heads, self._dim)
        return [self._to_host(store.gather(local, plane, index)).reshape(shape)
                for local in range(len(store.layers)) for plane in (0, 1)]

    def _to_host(self, native: Any) -> np.ndarray:
        """A gathered array on the host as the connector's layout holds it (a gather is
        a fresh array that aliases no pool, so a numpy one is used as it is)."""
        if self._dtype is DType.bfloat16:
            return host_bits(self._backend, native, self._dtype)
        if isinstance(native, np.ndarray) and native.dtype == self._host_dtype:
            return native
        return self._backend.to_numpy(native)

    # --- read-through ---------------------------------------------------------------

    def prepare(self, co: Coordinator, plan: AllocationPlan,
                request: AllocationRequest) -> Fetched | None:
        """Before the commit of an allocation that fits: the prompt's digests and, with
        a store, the run of blocks after the local hits (one round trip).  Changes no
        part of the cache; ``strict`` store errors propagate from here."""
        if plan.keys is None or plan.tokens is None:
            return None
        bs = co.block_size
        full = plan.keys.size
        rows = plan.tokens[:full * bs].reshape(full, bs)
        hits = plan.groups[0].acquire if len(co.groups) == 1 else None
        digests = self.digests.prompt(rows, plan.salt, hits)
        conn = self.connector
        n = request.num_tokens or 0
        limit = full if request.allow_full_hit else max(0, (n - 1) // bs)
        if conn is None or limit <= plan.hits:
            return Fetched(digests, [])
        wanted = digests[plan.hits:limit].tobytes()
        keys = [wanted[i:i + 16] for i in range(0, len(wanted), 16)]
        run = conn.fetch_run(keys)
        self.misses += len(keys) - len(run)
        return Fetched(digests, run)

    def committed(self, co: Coordinator, plan: AllocationPlan, row: int,
                  fetched: Fetched) -> None:
        """After the commit: the row's digests, then the fetched blocks copied into the
        fresh blocks after the local hits (one stack, one host-to-device copy and one
        scatter per layer), marked written and complete (so the prefix index serves
        them), and the row's cached tokens moved past them."""
        t = co.tables
        full = fetched.digests.size
        t.digest[row, :full] = fetched.digests
        self.digests.forget_stash()
        run = fetched.run
        if not run:
            return
        g = co.groups[0]
        bs, s, h = co.block_size, len(run), plan.hits
        blocks = g.table.blocks[row, h:h + s].copy()
        index = g.store.index((blocks[:, None] * bs + self._offsets).reshape(-1))
        layers = len(g.store.layers)
        for local in range(layers):
            stacked = np.stack([block[local] for block in run], axis=1)  # [2, s, bs, h, d]
            flat = stacked.reshape(2, s * bs, self._heads, self._dim)
            g.store.scatter(local, index, (self._native(flat[0]), self._native(flat[1])))
        new = g.store.mark_filled(np.arange(layers, dtype=np.int64), blocks)
        if new.size:
            g.prefix.on_complete(new)  # not offered: they came from the store
        cached = (h + s) * bs
        t.cached[row] = cached
        t.written[row, list(g.layout.layers)] = cached
        co.epoch += 1  # blocks other sequences may now share
        self.hits += s  # counted apart from the local prefix hits

    def _native(self, host: np.ndarray) -> Any:
        """Host K or V rows as the backend's array on the cache's device."""
        be, c = self._backend, self._config
        if self._dtype is not DType.bfloat16 and c.device.type == "cpu":
            try:
                return be.asarray(host, c.device)  # shares the host memory: no copy
            except Exception:  # noqa: BLE001 - a backend that cannot import it copies
                pass
        from ._backend import BITS_DTYPES
        return be.from_bits(host.view(BITS_DTYPES[self._dtype]), self._dtype, c.device)

    # --- statistics, lifetime ---------------------------------------------------------

    def stats(self) -> StoreStats | None:
        return None if self.connector is None else self.connector.stats()

    def stats_fields(self) -> dict[str, int]:
        """The store's share of :class:`~kvcore.CacheManagerStats`."""
        conn = self.connector
        if conn is None:
            return {}
        s = conn.stats()
        return {"store_hits": self.hits, "store_hit_tokens": self.hits * self._co.block_size,
                "store_misses": self.misses, "store_bytes_loaded": s.bytes_read,
                "store_bytes_stored": s.bytes_written, "store_blocks_written": s.blocks_written,
                "store_dropped_writes": s.dropped_writes + self.dropped,
                "store_errors": s.errors, "store_corrupt_misses": s.corrupt_values,
                "store_queued_blocks": s.queue_blocks}

    def flush(self, timeout: float | None) -> bool:
        """Wait for the write-behind queue (``True``: drained); ``strict``: raises the
        first write error."""
        if self.connector is None:
            return True
        drained = self.connector.flush(timeout)
        self._raise_write_error()
        return drained

    def _raise_write_error(self) -> None:
        error, self.write_error = self.write_error, None
        if error is not None and self.connector is not None and self.connector.strict:
            raise error

    def close(self) -> None:
        """Send what is queued (up to ``close_timeout``), stop the writer, close the store;
        afterwards no block is read from the pools (the manager releases them next)."""
        if self.connector is None:
            return
        try:
            self.connector.close(self._close_timeout)
        finally:
            with self._pools_lock:  # a writer still copying finishes first
                self._pools_gone = True
        self._raise_write_error()
