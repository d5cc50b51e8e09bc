"""Store namespaces: which blocks are comparable, and the store keys they live under.

Two caches may exchange a block only if its K/V mean the same thing to both: the same
layer count, head layout, dtype, block size (and, as they are added, layer groups and
codecs), the same model weights and adapter, and the same deployment.  A
:class:`StoreNamespace` fingerprints exactly that, and every store key starts with it::

    kvc1.<namespace>.<fingerprint: 32 hex>.<chain key: 32 hex>

* ``kvc1`` is the key format version;
* ``<namespace>`` is the user's deployment name in clear (``[A-Za-z0-9_-]``), so an
  operator can give each tenant a Redis ACL over ``~kvc1.<tenant>.*`` or delete one
  deployment's keys with a pattern;
* the fingerprint is a BLAKE2b-128 digest of a canonical JSON document of the layout
  fields (:data:`LAYOUT_FIELDS`), the model / adapter id and the namespace, so
  neither the model id nor any token id appears in clear;
* the chain key (:func:`kvcore.stores.chain_keys`) is a keyed digest of the prefix.

The same fingerprint is written into every value's header and checked on read, so a
value copied or written under the wrong namespace is refused as foreign.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreKeyError
from ._format import ArraySpec

__all__ = ["KEY_FORMAT", "LAYOUT_FIELDS", "NON_LAYOUT_FIELDS", "StoreNamespace", "block_layout",
           "layout_document",
           "layout_fingerprint"]

#: The first component of every store key; bump it when the key layout changes.
KEY_FORMAT = "kvc1"
#: The config fields that make K/V comparable, in the one place that lists them.
#: When CacheConfig grows a field, classify it here or in NON_LAYOUT_FIELDS (a test
#: fails until it is): layer groups, a KV codec such as fp8 or a sliding window change
#: what a block's bytes mean and belong here.  A listed field that a config lacks or
#: leaves at ``None`` is left out of the document, so an optional field added later
#: does not change the fingerprint of deployments that do not use it.
LAYOUT_FIELDS: tuple[str, ...] = (
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "block_size",
    "layer_groups",
)
#: CacheConfig fields that do not change what a block's bytes mean (pool sizes,
#: devices, policies, secrets): blocks move freely between caches that differ in them.
NON_LAYOUT_FIELDS: tuple[str, ...] = (
    "num_blocks",
    "compute_dtype",  # what reads decode to; a block's bytes (codes, scales) are the same
    "device",
    "enable_prefix_caching",
    "swap_blocks",
    "swap_device",
    "pressure_medium",
    "pressure_high",
    "pressure_critical",
    "hash_seed",
    "hash_key",
    "store",
    "store_options",
    "crypto_block_keys",
    # These two do decide which blocks are comparable, but they are not layout: they
    # enter the fingerprint as from_config's model_id / namespace (which default to
    # them), exactly as the arguments of a connector opened by hand.
    "model_id",
    "store_namespace",
)
_REQUIRED = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")
FINGERPRINT_SIZE = 16
_PERSON = b"kvcore.ns.v1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DEFAULT_NAMESPACE = "default"
#: from_config's default for model_id / namespace: take them from the config.
FROM_CONFIG: Any = type("FromConfig", (), {"__repr__": lambda self: "FROM_CONFIG"})()


def _canonical(value: Any) -> Any:
    """A JSON-able, order-independent form of a config value."""
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    dump = getattr(value, "model_dump", None)  # a pydantic model (a layer group, a codec)
    if callable(dump):
        return _canonical(dump(mode="json"))
    return str(value)


def layout_document(config: Any) -> dict[str, Any]:
    """The layout fields of ``config`` (a :class:`~kvcore.CacheConfig` or anything with
    the same attributes) that the fingerprint covers, canonicalised."""
    doc: dict[str, Any] = {}
    for name in LAYOUT_FIELDS:
        value = getattr(config, name, None)
        if name == "layer_groups":
            # Groups change what a block holds (kinds, layers, shapes, windows); their
            # pool sizes do not.  No groups: left out, so plain caches keep their key.
            value = [{k: v for k, v in _canonical(g).items() if k != "num_blocks"}
                     for g in value] if value else None
        if value is not None:
            doc[name] = value if name == "layer_groups" else _canonical(value)
    missing = [n for n in _REQUIRED if n not in doc]
    if missing:
        raise StoreKeyError(f"cannot fingerprint {type(config).__name__}: it has no "
                            f"{', '.join(missing)}")
    return doc


def _digest(document: dict[str, Any]) -> bytes:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode("ascii"), digest_size=FINGERPRINT_SIZE,
                           person=_PERSON).digest()


def layout_fingerprint(config: Any, *, model_id: str | None = None,
                       namespace: str = _DEFAULT_NAMESPACE) -> bytes:
    """16 bytes that differ whenever K/V written under ``config`` for ``model_id`` in
    ``namespace`` could mean something else than under another combination."""
    return _digest({"format": KEY_FORMAT, "layout": layout_document(config),
                    "model": model_id, "namespace": namespace})


@dataclass(frozen=True)
class StoreNamespace:
    """Where one deployment's blocks live in a store, and their fingerprint.

    Build it with :meth:`from_config`; two processes that build it from equal layouts,
    the same ``model_id`` and the same ``namespace`` share blocks (given the same
    ``hash_key`` for their chain keys), any other combination never does.
    """

    fingerprint: bytes
    namespace: str = _DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_SIZE:
            raise StoreKeyError(f"fingerprint must be {FINGERPRINT_SIZE} bytes, got "
                                f"{self.fingerprint!r}")
        _check_name(self.namespace)

    @classmethod
    def from_config(cls, config: Any, *, model_id: Any = FROM_CONFIG,
                    namespace: Any = FROM_CONFIG) -> StoreNamespace:
        """The namespace of ``config``'s layout, ``model_id`` (model and adapter, e.g.
        ``"meta-llama/Llama-3.1-8B@lora-7"``) and ``namespace`` (the deployment or
        tenant name, ``[A-Za-z0-9_-]{1,64}``).  Left out, they are the config's own
        ``model_id`` and ``store_namespace`` (``None`` and ``"default"`` when it has
        none)."""
        if model_id is FROM_CONFIG:
            model_id = getattr(config, "model_id", None)
        if namespace is FROM_CONFIG:
            namespace = getattr(config, "store_namespace", None) or _DEFAULT_NAMESPACE
        _check_name(namespace)
        if model_id is not None and not isinstance(model_id, str):
            raise StoreKeyError(f"model_id must be a str or None, got {model_id!r}")
        return cls(layout_fingerprint(config, model_id=model_id, namespace=namespace),
                   namespace)

    @property
    def prefix(self) -> str:
        """``kvc1.<namespace>.<fingerprint hex>.``: every key of this namespace starts so."""
        return f"{KEY_FORMAT}.{self.namespace}.{self.fingerprint.hex()}."

    def key(self, digest: bytes) -> str:
        """The store key of one chain key."""
        return self.keys([digest])[0]

    def keys(self, digests: Sequence[bytes]) -> list[str]:
        """The store keys of ``digests`` (chain keys of 16..64 bytes), in order."""
        prefix = self.prefix
        out = []
        for d in digests:
            if not isinstance(d, (bytes, bytearray)) or not 16 <= len(d) <= 64:
                raise StoreKeyError(f"a block digest must be 16..64 bytes, got {d!r}")
            out.append(prefix + d.hex())
        return out


def _check_name(namespace: object) -> None:
    if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
        raise StoreKeyError(f"namespace must be 1..64 characters of [A-Za-z0-9_-], got "
                            f"{namespace!r}")


#: How each kvcore dtype travels: the numpy dtype of the host arrays, and its label.
#: numpy has no bfloat16, so bfloat16 blocks travel as their raw 16-bit patterns
#: (view them with ``ml_dtypes.bfloat16`` if wanted); the label keeps them apart.
_HOST_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
                "bfloat16": np.dtype(np.uint16)}


def block_layout(config: Any) -> list[ArraySpec]:
    """The arrays of one block of ``config``, as the connector sends them: per layer
    one ``[2, block_size, num_kv_heads, head_dim]`` array (K then V), the pool's own
    ``pool[:, block]`` slice, so a block moves with one copy per layer."""
    doc = layout_document(config)
    label = str(doc["dtype"])
    if label not in _HOST_DTYPES:
        raise StoreKeyError(f"no host dtype for cache dtype {label!r}; known: "
                            f"{', '.join(_HOST_DTYPES)}")
    shape = (2, int(doc["block_size"]), int(doc["num_kv_heads"]), int(doc["head_dim"]))
    spec = ArraySpec(shape, _HOST_DTYPES[label], label)
    return [spec] * int(doc["num_layers"])
