"""Index arrays padded to bucket lengths, so a new batch size reuses compiled kernels.

XLA compiles one executable per input shape.  A decode step's index has one entry per
sequence of the batch, a read's one per token, so unpadded indices would recompile on
every new batch size or sequence length (about 30-50 ms each on the CPU).  Every index
is therefore padded to a *bucket* length: powers of two up to 64, then powers of two
and the midpoints between them (96, 128, 192, 256, 384, ...), so padding wastes at
most half a bucket below 64 and a third above.  Padding entries are ``-1``: the
kernels drop them on writes and clamp them on reads (:mod:`kv_jax._kernels`).

Indices are ``int32`` (JAX's default integer without ``jax_enable_x64``): a pool
therefore holds fewer than ``2**31 - 1`` slots, which :meth:`JaxBackend.allocate_layer`
enforces.

Rows written with an index must have the bucket's length too; rows of another length
are padded on the host (:func:`pad_rows`): one host copy of the new rows, no
compilation.  On the CPU, device memory is host memory, so this costs a ``memcpy`` of
the rows; a GPU port would pad on the device instead (see the README).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._convert import host_view
from ._devices import put_fixed

__all__ = ["MAX_SLOTS", "JaxIndex", "bucket", "pad_rows"]

#: The largest index value plus one: slots (and blocks) are int32.
MAX_SLOTS = 2**31 - 1
_MIN_BUCKET = 8
_PAD = -1


def bucket(n: int) -> int:
    """The padded length for an index of ``n`` entries (``n >= 0``)."""
    if n <= _MIN_BUCKET:
        return _MIN_BUCKET
    power = 1 << (n - 1).bit_length()  # the smallest power of two >= n
    if power <= 64:
        return power
    mid = 3 * power // 4
    return mid if n <= mid else power


class JaxIndex:
    """What :meth:`JaxBackend.index_array` returns: the indices on the host (for
    checks and shapes) and on the device, padded to :func:`bucket` length.

    Immutable by construction: the host copy is read-only and never shared with the
    caller, so an index cannot change after it was made.
    """

    __slots__ = ("host", "shape", "size", "bucket", "device", "hi")

    def __init__(self, indices: np.ndarray) -> None:
        host = np.array(indices, dtype=np.int64, copy=True)  # never alias the caller's
        if host.size:
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= MAX_SLOTS:
                bad = lo if lo < 0 else hi
                raise IndexError(f"index {bad} is outside 0..{MAX_SLOTS - 1}: the jax backend "
                                 "indexes slots and blocks with int32")
        else:
            hi = -1
        host.flags.writeable = False
        self.host = host
        self.shape = host.shape
        self.size = int(host.size)
        self.hi = hi
        self.bucket = bucket(self.size)
        padded = np.full(self.bucket, _PAD, dtype=np.int32)
        padded[:self.size] = host.reshape(-1)
        # ``padded`` is private: the transfer may alias it (zero-copy on the CPU),
        # and nothing ever writes to it again.
        self.device = put_fixed(padded)

    def check_bound(self, limit: int, what: str) -> None:
        """Raise ``IndexError`` unless every index is below ``limit``."""
        if self.hi >= limit:
            raise IndexError(f"{what} index {self.hi} is out of range for a pool of {limit} "
                             f"{what}s (0..{limit - 1})")

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __repr__(self) -> str:
        return f"JaxIndex(shape={self.shape}, bucket={self.bucket})"


def pad_rows(rows: Any, length: int) -> Any:
    """``rows`` (``[n, ...]``, a jax array) padded with zero rows to ``length``.

    Done on the host so that no kernel is compiled for ``n``: a zero-copy numpy view
    of ``rows`` (which waits until they are computed), one copy into a fresh buffer,
    and a transfer of that private buffer (compiled per bucket, not per length).  The padding rows are dropped by the
    write kernels; they are zero only so that nothing uninitialised exists.
    """
    host = host_view(rows)
    padded = np.zeros((length,) + host.shape[1:], dtype=host.dtype)
    padded[:host.shape[0]] = host
    return put_fixed(padded)
