"""Sharing and keeping KV blocks beyond one process: stores and the connector.

* :class:`Store` is the contract a store plugin implements (batch put / get / exists /
  delete of opaque bytes); :func:`open_store` opens one by URL
  (``file:///var/cache/kvcore`` and ``memory://name`` are built in;
  ``redis://``, ``rediss://`` and ``redis+cluster://`` come with ``kvcore[redis]``);
  :func:`list_stores` says what is installed and usable.  Plugins declare themselves
  in the entry-point group ``kvcore.stores`` and implement the ``kvcore_stores`` hook
  returning :class:`StoreSpec` records.
* :func:`chain_keys` computes the keyed cryptographic chain keys of full blocks;
  :class:`StoreNamespace` fingerprints the layout and names the store keys.
* :func:`encode_block` / :func:`decode_block` are the value format (a versioned,
  checked header and raw bytes; never pickles).
* :class:`StoreConnector` is what a cache manager owns: write-behind ``offer``,
  read-through ``fetch_run``, a circuit breaker and :class:`StoreStats` counters.

Importing this package imports no client library (redis is imported when a Redis
store is opened).
"""

from __future__ import annotations

from ._breaker import BreakerState, CircuitBreaker
from ._connector import StoreConnector
from ._disk import DiskStore
from ._format import (FORMAT_VERSION, MAGIC, ArraySpec, decode_block, encode_block,
                      encoded_size, peek_header)
from ._hookspecs import ENTRY_POINT_GROUP, StoreSpec, kvcore_stores
from ._keys import DIGEST_SIZE, ROOT_PARENT, chain_keys, new_hash_key
from ._memory import MemoryStore
from ._namespace import (KEY_FORMAT, LAYOUT_FIELDS, NON_LAYOUT_FIELDS, StoreNamespace,
                         block_layout, layout_document, layout_fingerprint)
from ._registry import (StoreRecord, StoreRegistry, list_stores, open_store, refresh_stores,
                        register_store, unregister_store)
from ._stats import StoreStats
from ._store import STORE_API_VERSION, Store, Value, ValueParts, check_items, check_keys
from ._url import StoreOptions, redact_url, url_scheme

__all__ = [
    "DIGEST_SIZE",
    "ENTRY_POINT_GROUP",
    "FORMAT_VERSION",
    "KEY_FORMAT",
    "LAYOUT_FIELDS",
    "MAGIC",
    "NON_LAYOUT_FIELDS",
    "ROOT_PARENT",
    "STORE_API_VERSION",
    "ArraySpec",
    "BreakerState",
    "CircuitBreaker",
    "DiskStore",
    "MemoryStore",
    "Store",
    "StoreConnector",
    "StoreNamespace",
    "StoreOptions",
    "StoreRecord",
    "StoreRegistry",
    "StoreSpec",
    "StoreStats",
    "Value",
    "ValueParts",
    "block_layout",
    "chain_keys",
    "check_items",
    "check_keys",
    "decode_block",
    "encode_block",
    "encoded_size",
    "kvcore_stores",
    "layout_document",
    "layout_fingerprint",
    "list_stores",
    "new_hash_key",
    "open_store",
    "peek_header",
    "redact_url",
    "refresh_stores",
    "register_store",
    "unregister_store",
    "url_scheme",
]
