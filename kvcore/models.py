"""Validated, immutable, JSON-serialisable records: configuration, requests, statistics.

These are pydantic v2 models with ``frozen=True`` and ``extra="forbid"``: a typo in a
field name or a negative count is refused at construction with a
``pydantic.ValidationError`` that names the field.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import Annotated, Any, NamedTuple

import numpy as np
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      PrivateAttr, SecretBytes, model_validator)

from ._chain_hash import token_array
from ._codecs import codec_for
from ._device import Device, DType

__all__ = [
    "AllocationRequest",
    "CacheConfig",
    "GroupKind",
    "LayerGroup",
    "CacheGcStats",
    "CacheHandleStats",
    "CacheManagerStats",
    "MemoryPressure",
    "blocks_in_budget",
    "bytes_per_token",
]

DeviceField = Annotated[Device, BeforeValidator(Device.parse), PlainSerializer(str, return_type=str)]
DTypeField = Annotated[DType, BeforeValidator(DType.parse), PlainSerializer(str, return_type=str)]


def _strict_int(value: Any) -> Any:
    """Counts are ints: refuse bools (``True`` is not 1 block), floats and strings
    instead of letting them pass as numbers; accept numpy integers."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"expected an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _strict_float(value: Any) -> Any:
    """Fractions are numbers: refuse bools and strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"expected a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _token_ids(value: Any) -> Any:
    if value is None:
        return None
    return tuple(token_array(value, "prompt_token_ids").tolist())


def _at_least(low: int) -> Any:
    """:func:`_strict_int` and the bound, checked here so the message names the value
    (a config hides pydantic's ``input_value``: it may hold secrets)."""
    def check(value: Any) -> int:
        number = _strict_int(value)
        if number < low:
            raise ValueError(f"expected an int >= {low}, got {number}")
        return number
    return check


def _fraction(value: Any) -> float:
    number = _strict_float(value)
    if not 0 < number <= 1:
        raise ValueError(f"expected a fraction in (0, 1], got {number!r}")
    return number


def _strict_bool(value: Any) -> bool:
    """Switches are bools: refuse ``1``, ``"yes"`` and ``None``, naming the value (a
    config hides pydantic's ``input_value``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"expected True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


Flag = Annotated[bool, BeforeValidator(_strict_bool)]
PositiveInt = Annotated[int, BeforeValidator(_at_least(1)), Field(gt=0)]
NonNegativeInt = Annotated[int, BeforeValidator(_at_least(0)), Field(ge=0)]
TokenIds = Annotated[tuple[int, ...] | None, BeforeValidator(_token_ids)]
Fraction = Annotated[float, BeforeValidator(_fraction), Field(gt=0, le=1)]

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Option names whose values are secrets: never shown in a repr or a JSON dump.
_SECRET_OPTIONS = ("password", "ssl_password", "mac_key")


def _store_url(value: Any) -> Any:
    """``store``: ``None`` or a URL with a scheme (the plugin, its options and the
    server are checked when a manager opens it).  Never echoes the URL: it may hold
    a password."""
    if value is None:
        return None
    if not isinstance(value, str) or not _URL_SCHEME.match(value.strip()):
        what = "a str without a scheme" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"store must be a URL such as redis://host:6379/0, "
                         f"redis+cluster://host:7000 or file:///var/cache/kvcore, got {what}")
    return value.strip()


def _redacted_url(value: str | None) -> str | None:
    if value is None:
        return None
    from .stores._url import redact_url  # only configs with a store get here
    return redact_url(value)


def _redacted_options(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {k: "***" if k in _SECRET_OPTIONS else v for k, v in value.items()}


def _store_options(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"store_options must be a dict of option names (str) to values, got "
                         f"{type(value).__name__}")
    return dict(value)


def _hash_key(value: Any) -> Any:
    """``hash_key``: 16..64 secret bytes; the message names the type or length, never
    the bytes."""
    if value is None:
        return None
    if isinstance(value, SecretBytes):
        value = value.get_secret_value()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"hash_key must be 16..64 bytes, got {type(value).__name__} (make one "
                         "with kvcore.stores.new_hash_key(); from hex: bytes.fromhex(text))")
    raw = bytes(value)
    if not 16 <= len(raw) <= 64:
        raise ValueError(f"hash_key must be 16..64 bytes, got {len(raw)} bytes (make one with "
                         "kvcore.stores.new_hash_key())")
    return SecretBytes(raw)


def _namespace(value: Any) -> Any:
    if not isinstance(value, str) or not _NAMESPACE.match(value):
        raise ValueError(f"store_namespace must be 1..64 characters of [A-Za-z0-9_-], got "
                         f"{value!r}")
    return value


def _model_id(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 256):
        raise ValueError(f"model_id must be a str of 1..256 characters or None, got {value!r}")
    return value


StoreUrl = Annotated[str | None, BeforeValidator(_store_url),
                     PlainSerializer(_redacted_url, when_used="json")]
StoreOptionsField = Annotated[dict[str, Any] | None, BeforeValidator(_store_options),
                              PlainSerializer(_redacted_options, when_used="json")]
HashKey = Annotated[SecretBytes | None, BeforeValidator(_hash_key)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class MemoryPressure(str, enum.Enum):
    """How full the block pool is, by the thresholds in :class:`CacheConfig`."""

    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


class GroupKind(str, enum.Enum):
    """How the layers of a :class:`LayerGroup` keep their K/V."""

    #: Every token, K and V per KV head (the common attention layer).
    full = "full"
    #: Only the last ``window`` tokens are needed; older blocks are released.
    sliding = "sliding"
    #: One compressed vector per token (multi-head latent attention, MLA).
    latent = "latent"
    #: A fixed number of encoder tokens per sequence, written once (cross-attention).
    cross = "cross"


class LayerGroup(_Record):
    """Layers whose K/V share one layout and one policy, and one block pool.

    A config without groups is one ``full`` group of every layer with the config's
    ``num_kv_heads`` and ``head_dim``.  ``num_kv_heads`` / ``head_dim`` default to the
    config's; ``v_head_dim`` (the width of V, when it differs from K's) to
    ``head_dim``; ``num_blocks`` to the config's.
    """

    kind: GroupKind = GroupKind.full
    layers: tuple[NonNegativeInt, ...] = Field(min_length=1)
    num_kv_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None
    #: ``sliding``: a query at position ``p`` reads keys ``p - window + 1 .. p``.
    window: PositiveInt | None = None
    #: ``latent``: the width of the one vector kept per token.
    latent_dim: PositiveInt | None = None
    #: ``cross``: the most encoder tokens one sequence holds.
    encoder_tokens: PositiveInt | None = None
    num_blocks: PositiveInt | None = None

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> LayerGroup:
        kind = self.kind
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)} name a layer twice")
        needs = {GroupKind.sliding: "window", GroupKind.latent: "latent_dim",
                 GroupKind.cross: "encoder_tokens"}
        for k, name in needs.items():
            given = getattr(self, name) is not None
            if kind is k and not given:
                raise ValueError(f"a {k.value!r} group needs {name}")
            if kind is not k and given:
                raise ValueError(f"{name} applies to {k.value!r} groups only, not "
                                 f"{kind.value!r}")
        if kind is GroupKind.latent:
            for name in ("num_kv_heads", "head_dim", "v_head_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(f"a 'latent' group keeps one vector of latent_dim per "
                                     f"token; {name} does not apply")
        return self


class GroupLayout(NamedTuple):
    """A :class:`LayerGroup` with every default filled in (what the manager uses)."""

    index: int
    kind: GroupKind
    layers: tuple[int, ...]
    num_kv_heads: int
    k_dim: int
    #: ``None`` for latent groups: they keep one plane.
    v_dim: int | None
    window: int | None
    encoder_tokens: int | None
    num_blocks: int

    @property
    def token_based(self) -> bool:
        """Whether blocks follow the decoder tokens (every kind but ``cross``)."""
        return self.kind is not GroupKind.cross

    def bytes_per_token(self, dtype: DType | int) -> int:
        """K/V bytes of one token over the group's layers, for a cache of ``dtype``
        (a codec adds its scale per head and plane); an ``int`` is an element size."""
        scales = 0
        if isinstance(dtype, DType):
            codec = codec_for(dtype)
            if codec is not None:
                scales = codec.scale_dtype.itemsize * (1 if self.v_dim is None else 2)
            dtype = dtype.itemsize
        per_layer = self.num_kv_heads * ((self.k_dim + (self.v_dim or 0)) * dtype + scales)
        return per_layer * len(self.layers)


class CacheConfig(_Record):
    """The shape of a paged KV cache and the policies of the manager that owns it.

    Build one from a block count, or from a byte budget with
    :meth:`from_memory_budget`.  ``layer_groups`` describes models whose layers keep
    different K/V (sliding windows, latent attention, cross-attention, other head
    counts); without it every layer is a full-attention layer of ``num_kv_heads``
    heads of ``head_dim``.
    """

    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    #: What the pools hold: a float dtype (K/V as written), or a quantized codec
    #: (``float8_e4m3``, ``float8_e5m2``, ``int8``: one byte per element plus a float32
    #: scale per token and head; see ``docs/quantized-kv.md``).
    dtype: DTypeField = DType.float16
    #: The float dtype K/V are written and read in: ``dtype`` itself for a float
    #: cache, ``float16`` by default for a codec.  Filled in at construction.
    compute_dtype: DTypeField | None = None
    block_size: PositiveInt = 16
    num_blocks: PositiveInt
    device: DeviceField = Device("cpu")
    enable_prefix_caching: Flag = True
    #: Blocks in the swap pool (0: no swapping).  The swap pool lives on ``swap_device``.
    swap_blocks: NonNegativeInt = 0
    swap_device: DeviceField = Device("cpu")
    #: Fractions of the pool in use (not free, not evictable) at which pressure rises.
    pressure_medium: Fraction = 0.70
    pressure_high: Fraction = 0.85
    pressure_critical: Fraction = 0.95
    #: Secret of the in-process prefix-cache keys.  ``None`` (the default) draws a
    #: random one per manager, so nothing outside the process can aim at the keys;
    #: hits are verified exactly either way (a key collision costs a miss, never data).
    hash_seed: Annotated[int, BeforeValidator(_strict_int)] | None = None
    layer_groups: tuple[LayerGroup, ...] = ()
    #: A store to share full prefix blocks through (``redis://host:6379/0``,
    #: ``redis+cluster://h:7000``, ``file:///var/cache/kvcore``, ``memory://name``):
    #: completed blocks are written behind, ``allocate`` reads the next blocks of a
    #: prompt through (see docs/scale-out.md).  Needs ``hash_key``; configs without
    #: ``layer_groups`` only (a manager refuses others).
    store: StoreUrl = None
    #: Options for the store (``password``, ``timeout``, TLS files...) and the
    #: connector (``strict``, ``queue_blocks``, ``queue_bytes``, ``batch_blocks``,
    #: ``batch_bytes``, ``failure_threshold``, ``cooldown_s``, ``skip_existing``,
    #: ``delete_corrupt``, ``read_window``) and ``authenticate`` (a MAC on every
    #: value, keyed from ``hash_key``) and ``close_timeout`` (seconds ``close()`` waits
    #: for queued writes).  Secret values are never shown in a repr or JSON dump.
    store_options: StoreOptionsField = None
    #: The secret (16..64 bytes) the keyed cryptographic block keys are computed with.
    #: Required with ``store``: every process that should share blocks must have the
    #: same one, and nobody else (whoever holds it can compute the key of any prompt
    #: they can guess).  With ``crypto_block_keys`` alone, ``None`` draws a random one
    #: per manager.  Never shown in a repr, an error or a JSON dump.
    hash_key: HashKey = None
    #: Compute the keyed BLAKE2b chain key of every full block (issue 10) even without
    #: a store (``KvCacheManager.block_digests``); always on with a store.
    crypto_block_keys: Flag = False
    #: The model and adapter the K/V come from (``"meta-llama/Llama-3.1-8B@lora-7"``):
    #: part of the store namespace's fingerprint, so blocks of other weights never mix.
    model_id: Annotated[str | None, BeforeValidator(_model_id)] = None
    #: The deployment / tenant name every store key starts with (``kvc1.<name>.``).
    store_namespace: Annotated[str, BeforeValidator(_namespace)] = "default"

    # A config may hold secrets (hash_key, a store password): errors never echo input.
    model_config = ConfigDict(hide_input_in_errors=True)

    def __hash__(self) -> int:
        # store_options is a dict: hash every other field (equal configs still hash equal).
        return hash(tuple(v for k, v in self.__dict__.items() if k != "store_options"))

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "store":
                value = _redacted_url(value)
            elif name == "store_options":
                value = _redacted_options(value)
            yield name, value

    @model_validator(mode="after")
    def _store_fields_fit(self) -> CacheConfig:
        if self.store is not None:
            if self.hash_key is None:
                raise ValueError(
                    "store is set but hash_key is not: blocks are shared only between "
                    "processes with the same secret hash_key (16..64 bytes; make one with "
                    "kvcore.stores.new_hash_key() and give it to every process that should "
                    "share blocks, and to nobody else)")
            if not self.enable_prefix_caching:
                raise ValueError("store needs enable_prefix_caching=True: blocks are found in "
                                 "a store by their prefix chain")
        else:
            if self.store_options is not None:
                raise ValueError("store_options is set but store is not")
            if self.hash_key is not None and not self.crypto_block_keys:
                raise ValueError("hash_key is used only with store=... or "
                                 "crypto_block_keys=True")
        return self

    @model_validator(mode="after")
    def _dtypes_fit(self) -> CacheConfig:
        dtype, compute = self.dtype, self.compute_dtype
        if not (dtype.is_float or dtype.is_codec):
            raise ValueError(f"dtype {dtype.value!r} is a storage type of codec pools, not a "
                             "cache dtype; use float16, bfloat16, float32 or a codec: "
                             "float8_e4m3, float8_e5m2, int8")
        if compute is None:
            compute = dtype if dtype.is_float else DType.float16
        elif dtype.is_float and compute is not dtype:
            raise ValueError(f"compute_dtype={compute.value!r} differs from dtype="
                             f"{dtype.value!r}: a float cache is written and read in its own "
                             "dtype (compute_dtype applies to codecs)")
        elif not compute.is_float:
            raise ValueError(f"compute_dtype must be float16, bfloat16 or float32 (what K/V "
                             f"are written and read in), got {compute.value!r}")
        object.__setattr__(self, "compute_dtype", compute)
        return self

    @property
    def codec(self) -> Any:
        """The :class:`~kvcore._codecs.Codec` of a quantized cache; ``None`` for a float
        dtype."""
        return codec_for(self.dtype)

    @model_validator(mode="after")
    def _groups_cover_every_layer_once(self) -> CacheConfig:
        if not self.layer_groups:
            return self
        seen: dict[int, int] = {}
        for g, group in enumerate(self.layer_groups):
            for layer in group.layers:
                if layer >= self.num_layers:
                    raise ValueError(f"layer_groups[{g}] names layer {layer}, but the cache "
                                     f"has {self.num_layers} layers (0..{self.num_layers - 1})")
                if layer in seen:
                    raise ValueError(f"layer {layer} is in layer_groups[{seen[layer]}] and "
                                     f"layer_groups[{g}]")
                seen[layer] = g
        missing = sorted(set(range(self.num_layers)) - set(seen))
        if missing:
            raise ValueError(f"layers {missing} are in no layer group; every layer of "
                             f"0..{self.num_layers - 1} needs one")
        return self

    @property
    def groups(self) -> tuple[GroupLayout, ...]:
        """The layer groups with every default filled in (one full group of every
        layer when ``layer_groups`` is empty).  Computed on each call: keep the result
        where it is used often."""
        specs = self.layer_groups or (LayerGroup(layers=tuple(range(self.num_layers))),)
        out = []
        for i, g in enumerate(specs):
            if g.kind is GroupKind.latent:
                heads, k_dim, v_dim = 1, g.latent_dim, None
            else:
                heads = g.num_kv_heads or self.num_kv_heads
                k_dim = g.head_dim or self.head_dim
                v_dim = g.v_head_dim or k_dim
            out.append(GroupLayout(i, g.kind, tuple(g.layers), heads, k_dim,  # type: ignore[arg-type]
                                   v_dim, g.window, g.encoder_tokens,
                                   g.num_blocks or self.num_blocks))
        return tuple(out)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> CacheConfig:
        if not self.pressure_medium <= self.pressure_high <= self.pressure_critical:
            raise ValueError(
                "pressure thresholds must satisfy pressure_medium <= pressure_high <= "
                f"pressure_critical, got {self.pressure_medium}, {self.pressure_high}, "
                f"{self.pressure_critical}")
        return self

    # --- sizing -------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        """K and V of one decoder token across all layers that keep decoder tokens."""
        if not self.layer_groups:
            return bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim,
                                   self.dtype)
        return sum(g.bytes_per_token(self.dtype) for g in self.groups if g.token_based)

    def group_bytes_per_block(self, group: int) -> int:
        """Bytes of one block of layer group ``group`` (all its layers, K and V, and a
        codec's scales)."""
        return self.groups[group].bytes_per_token(self.dtype) * self.block_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block of every group (a block's worth of tokens everywhere)."""
        return sum(self.group_bytes_per_block(g.index) for g in self.groups)

    @property
    def total_bytes(self) -> int:
        """Bytes of every pool (all groups)."""
        return sum(self.group_bytes_per_block(g.index) * g.num_blocks for g in self.groups)

    @property
    def max_tokens(self) -> int:
        return self.block_size * self.num_blocks

    @classmethod
    def from_memory_budget(cls, memory_bytes: int, **fields: Any) -> CacheConfig:
        """A config whose pool is as many blocks as fit in ``memory_bytes``."""
        probe = cls(num_blocks=1, **fields)
        num_blocks = blocks_in_budget(memory_bytes, probe.bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"memory budget of {memory_bytes} bytes is smaller than one "
                             f"block ({probe.bytes_per_block} bytes)")
        return cls(num_blocks=num_blocks, **fields)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: DType | str) -> int:
    """Bytes of K and V for one token across ``num_layers`` layers (with a codec's
    float32 scale per head, K and V)."""
    dtype = DType.parse(dtype)
    codec = codec_for(dtype)
    scales = 0 if codec is None else codec.scale_dtype.itemsize
    return 2 * num_layers * num_kv_heads * (head_dim * dtype.itemsize + scales)


def blocks_in_budget(memory_bytes: int, bytes_per_block: int) -> int:
    """Whole blocks of ``bytes_per_block`` that fit in ``memory_bytes``."""
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    return memory_bytes // bytes_per_block


class _TokenArray:
    """A request's token ids as int32, kept beside the tuple they came from.  A cache:
    it never makes two requests differ."""

    __slots__ = ("ids", "array")

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.ids = ids
        self.array = np.fromiter(ids, dtype=np.int32, count=len(ids))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TokenArray)

    __hash__ = None  # type: ignore[assignment]


class AllocationRequest(_Record):
    """Ask for a cache for one sequence.

    Give ``num_tokens`` for room without prefix caching, or ``prompt_token_ids`` to let
    full prompt blocks be shared with earlier sequences that had the same prefix.

    ``extra_key`` is the *salt* (vLLM and TensorRT-LLM call it ``cache_salt``): blocks
    are shared only between requests with the same salt, so give every tenant (or
    model, or LoRA adapter) its own.

    By default a prompt hit never covers the block holding the last prompt token, so
    an engine always computes at least one token and gets its logits (vLLM's rule);
    ``allow_full_hit=True`` lets a fully cached prompt be served entirely (callers
    that only want storage).  ``join_pending=True`` also shares blocks whose prefill
    is still in flight, for requests admitted in the same step as the one computing
    them: the caller promises that the writer's K/V reach each layer before this
    request reads that layer (true within one batched forward pass); a read that
    would break the promise raises :class:`~kvcore.errors.PendingPrefixError`.
    """

    request_id: str = Field(min_length=1)
    num_tokens: NonNegativeInt | None = None
    prompt_token_ids: TokenIds = None
    extra_key: str | None = None
    allow_full_hit: Flag = False
    join_pending: Flag = False
    #: Encoder tokens to reserve in cross-attention layer groups (default: the
    #: group's ``encoder_tokens``).
    encoder_tokens: PositiveInt | None = None
    # The prompt as int32, made once with the request (the caller's work, not the
    # cache's), for the tuple it was made from (a model_copy with new ids makes anew).
    _token_array: _TokenArray | None = PrivateAttr(None)

    def token_array(self) -> np.ndarray | None:
        """``prompt_token_ids`` as an int32 array (``None`` without token ids)."""
        ids = self.prompt_token_ids
        if ids is None:
            return None
        cached = self._token_array
        if cached is None or cached.ids is not ids:
            cached = self._token_array = _TokenArray(ids)
        return cached.array

    @model_validator(mode="after")
    def _length_consistent(self) -> AllocationRequest:
        if self.prompt_token_ids is not None:
            self.token_array()
            n = len(self.prompt_token_ids)
            if self.num_tokens is None:
                object.__setattr__(self, "num_tokens", n)
            elif self.num_tokens != n:
                raise ValueError(f"num_tokens={self.num_tokens} differs from "
                                 f"len(prompt_token_ids)={n}")
        elif self.num_tokens is None:
            object.__setattr__(self, "num_tokens", 0)
        return self


class CacheHandleStats(_Record):
    """One sequence's footprint in the cache."""

    memory_bytes: NonNegativeInt
    blocks_allocated: NonNegativeInt
    #: Blocks a sliding window gave back (their tokens are no longer read).
    blocks_released: NonNegativeInt = 0
    tokens_stored: NonNegativeInt
    utilization: float = Field(ge=0.0, le=1.0)
    last_access: datetime = Field(default_factory=_utcnow)


class CacheManagerStats(_Record):
    """The whole pool, at one moment."""

    total_blocks: NonNegativeInt
    #: Blocks holding no data anyone may reuse.
    free_blocks: NonNegativeInt
    #: Blocks no sequence uses that still hold a prefix-cached block (evictable).
    cached_blocks: NonNegativeInt
    #: Blocks referenced by at least one sequence.
    used_blocks: NonNegativeInt
    block_size: PositiveInt
    memory_bytes: NonNegativeInt
    used_memory_bytes: NonNegativeInt
    active_caches: NonNegativeInt
    swapped_caches: NonNegativeInt = 0
    swap_total_blocks: NonNegativeInt = 0
    swap_free_blocks: NonNegativeInt = 0
    #: Full prompt blocks looked up in the prefix cache, and blocks served from it.
    prefix_cache_queries: NonNegativeInt = 0
    prefix_cache_hits: NonNegativeInt = 0
    prefix_cache_hit_rate: float = Field(0.0, ge=0.0, le=1.0)
    #: The same in tokens, as vLLM reports them: prompt tokens of requests allocated
    #: with token ids, and prompt tokens served from the cache.
    prefix_cache_query_tokens: NonNegativeInt = 0
    prefix_cache_hit_tokens: NonNegativeInt = 0
    evictions: NonNegativeInt = 0
    allocations: NonNegativeInt = 0
    allocation_failures: NonNegativeInt = 0
    copy_on_write_copies: NonNegativeInt = 0
    #: Blocks sliding windows gave back while their sequences went on (lifetime).
    window_released_blocks: NonNegativeInt = 0
    pressure: MemoryPressure = MemoryPressure.low
    utilization: float = Field(0.0, ge=0.0, le=1.0)
    #: With a store (``CacheConfig.store``; all 0 without): prompt blocks loaded from
    #: it at allocation (apart from the local ``prefix_cache_hits``), and their tokens;
    #: blocks asked for and not served (absent, damaged, or the store failing).
    store_hits: NonNegativeInt = 0
    store_hit_tokens: NonNegativeInt = 0
    store_misses: NonNegativeInt = 0
    #: Bytes of values read from / written to the store.
    store_bytes_loaded: NonNegativeInt = 0
    store_bytes_stored: NonNegativeInt = 0
    #: Completed blocks written to the store, and those dropped (queue full, store
    #: failing or circuit open): write-behind never waits.
    store_blocks_written: NonNegativeInt = 0
    store_dropped_writes: NonNegativeInt = 0
    #: Store calls that failed or timed out, and values refused as damaged or foreign
    #: (each a miss, and deleted).
    store_errors: NonNegativeInt = 0
    store_corrupt_misses: NonNegativeInt = 0
    #: Blocks waiting in the write-behind queue now.
    store_queued_blocks: NonNegativeInt = 0

    @model_validator(mode="after")
    def _blocks_add_up(self) -> CacheManagerStats:
        parts = self.free_blocks + self.cached_blocks + self.used_blocks
        if parts != self.total_blocks:
            raise ValueError(f"free_blocks + cached_blocks + used_blocks = {parts} differs "
                             f"from total_blocks = {self.total_blocks}")
        return self


class CacheGcStats(_Record):
    """What one :meth:`KvCacheManager.gc` call reclaimed."""

    blocks_freed: NonNegativeInt
    bytes_freed: NonNegativeInt
    handles_collected: NonNegativeInt = 0
    duration_s: float = Field(ge=0.0)
