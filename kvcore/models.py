"""Validated, immutable, JSON-serialisable records: configuration, requests, statistics.

These are pydantic v2 models with ``frozen=True`` and ``extra="forbid"``: a typo in a
field name or a negative count is refused at construction with a
``pydantic.ValidationError`` that names the field.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any

import numpy as np
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StrictBool,
                      model_validator)

from ._chain_hash import token_array
from ._device import Device, DType

__all__ = [
    "AllocationRequest",
    "CacheConfig",
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


PositiveInt = Annotated[int, BeforeValidator(_strict_int), Field(gt=0)]
NonNegativeInt = Annotated[int, BeforeValidator(_strict_int), Field(ge=0)]
TokenIds = Annotated[tuple[int, ...] | None, BeforeValidator(_token_ids)]
Fraction = Annotated[float, BeforeValidator(_strict_float), Field(gt=0, le=1)]


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


class CacheConfig(_Record):
    """The shape of a paged KV cache and the policies of the manager that owns it.

    Build one from a block count, or from a byte budget with
    :meth:`from_memory_budget`.
    """

    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: DTypeField = DType.float16
    block_size: PositiveInt = 16
    num_blocks: PositiveInt
    device: DeviceField = Device("cpu")
    enable_prefix_caching: StrictBool = True
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
        """K and V of one token across all layers."""
        return bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

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
    """Bytes of K and V for one token across ``num_layers`` layers."""
    return 2 * num_layers * num_kv_heads * head_dim * DType.parse(dtype).itemsize


def blocks_in_budget(memory_bytes: int, bytes_per_block: int) -> int:
    """Whole blocks of ``bytes_per_block`` that fit in ``memory_bytes``."""
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    return memory_bytes // bytes_per_block


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
    allow_full_hit: StrictBool = False
    join_pending: StrictBool = False

    @model_validator(mode="after")
    def _length_consistent(self) -> AllocationRequest:
        if self.prompt_token_ids is not None:
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
    pressure: MemoryPressure = MemoryPressure.low
    utilization: float = Field(0.0, ge=0.0, le=1.0)

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
