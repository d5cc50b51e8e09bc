"""What a store connector counts: a validated, immutable, JSON-serialisable record."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from ._breaker import BreakerState

__all__ = ["StoreStats"]


class StoreStats(BaseModel):
    """The counters of one :class:`~kvcore.stores.StoreConnector`, at one moment.

    Blocks are counted, not keys of other kinds.  ``hits + misses`` is every block
    asked for through :meth:`~kvcore.stores.StoreConnector.fetch_run`; a block after
    the first miss of a run counts as a miss too (it cannot be used).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(description="the store's URL, without secrets")
    lookups: NonNegativeInt = 0
    hits: NonNegativeInt = 0
    misses: NonNegativeInt = 0
    hit_rate: float = Field(0.0, ge=0.0, le=1.0)
    bytes_read: NonNegativeInt = 0
    bytes_written: NonNegativeInt = 0
    #: Blocks handed to offer() and accepted onto the write-behind queue.
    blocks_offered: NonNegativeInt = 0
    blocks_written: NonNegativeInt = 0
    #: Offered blocks already in the store (checked before sending them).
    blocks_skipped_existing: NonNegativeInt = 0
    #: Blocks not written: queue full, breaker open, their batch failed, or changed.
    dropped_writes: NonNegativeInt = 0
    #: Blocks offered lazily (``offer_lazy``) that changed before the writer thread
    #: copied them: not written (a manager's block freed or reused meanwhile).
    blocks_changed: NonNegativeInt = 0
    #: Store calls that failed (unreachable, timed out, a node down).
    errors: NonNegativeInt = 0
    timeouts: NonNegativeInt = 0
    #: Lookups answered without asking the store because the breaker was open.
    breaker_rejections: NonNegativeInt = 0
    #: Values that failed their checks (damaged, truncated, foreign): each a miss.
    corrupt_values: NonNegativeInt = 0
    #: Of those, how many were deleted from the store.
    deleted_values: NonNegativeInt = 0
    breaker_state: BreakerState = BreakerState.closed
    breaker_opens: NonNegativeInt = 0
    queue_blocks: NonNegativeInt = 0
    queue_bytes: NonNegativeInt = 0
    #: The last error's message (redacted), for a status page.
    last_error: str | None = None
