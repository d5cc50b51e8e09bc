"""BlockCodec: the value format for one fixed block layout, with the header precomputed.

:func:`encode_block` / :func:`decode_block` take any arrays and parse every header
field by field; a connector moves blocks of one layout only, so every value it writes
or accepts has, apart from the block key and the two checks, the *same* header bytes.
The codec builds them once: encoding is a concatenation and one checksum pass,
decoding one comparison of the header against the expected bytes, the two checks and
one ``frombuffer``.  Any value whose header differs goes through :func:`decode_block`,
which names exactly what is wrong (and raises, as it must: a value of this layout
cannot have another header).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import CorruptBlockError, StoreKeyError
from ._format import (ArraySpec, _label_bytes, arrays_from, byte_view, checked_head,
                      decode_block, fixed_header, seal, table_entry, verify_payload)
from ._store import ValueParts

__all__ = ["BlockCodec"]

_CRC = struct.Struct("<I")


class BlockCodec:
    """Encode and decode blocks of ``layout`` (one :class:`ArraySpec` per array) under
    ``fingerprint``, authenticated with ``mac_key`` when given.  Thread-safe
    (immutable after construction)."""

    def __init__(self, fingerprint: bytes, layout: Sequence[Any], *, key_len: int = 16,
                 mac_key: bytes | None = None) -> None:
        if not isinstance(fingerprint, bytes) or len(fingerprint) != 16:
            raise StoreKeyError(f"fingerprint must be 16 bytes, got {fingerprint!r}")
        if isinstance(key_len, bool) or not isinstance(key_len, int) or not 0 <= key_len <= 64:
            raise StoreKeyError(f"key_len must be 0..64, got {key_len!r}")
        self.fingerprint = fingerprint
        self.specs = tuple(ArraySpec.of(s) for s in layout)
        if not self.specs:
            raise StoreKeyError("a block layout needs at least one array")
        self.mac_key = mac_key
        self.key_len = key_len
        self.labels = [s.label for s in self.specs]
        table = b"".join(table_entry(_label_bytes(s.label), s.dtype.itemsize, s.shape)
                         for s in self.specs)
        self.payload_len = sum(s.nbytes for s in self.specs)
        self._fixed = fixed_header(fingerprint, len(self.specs), key_len, len(table),
                                   self.payload_len, mac_key is not None)
        self._table = table
        check_len = 16 if mac_key is not None else _CRC.size
        self._check_at = len(self._fixed) + key_len + len(table)
        self.header_len = self._check_at + check_len + _CRC.size
        self.value_len = self.header_len + self.payload_len
        first = self.specs[0]
        # Every layer alike (the usual case): one frombuffer for all of them.
        self._stacked = (len(self.specs) > 1 and first.nbytes > 0
                         and all(s == first for s in self.specs))

    def encode(self, key: bytes, arrays: Sequence[np.ndarray]) -> bytes:
        """The value of one block.  ``arrays`` must match :attr:`specs` (the connector
        checks that when blocks are offered); non-contiguous ones are copied."""
        if len(key) != self.key_len:
            raise StoreKeyError(f"block key must be {self.key_len} bytes, got {len(key)}")
        views = [byte_view(np.ascontiguousarray(a)) for a in arrays]
        return seal(self._fixed + key + self._table, views, self.mac_key)

    def encode_parts(self, key: bytes, arrays: Sequence[np.ndarray]) -> ValueParts:
        """The same value as :meth:`encode`, as the header plus the arrays' own memory
        (no copy of the payload; the arrays must not change until it is written)."""
        if len(key) != self.key_len:
            raise StoreKeyError(f"block key must be {self.key_len} bytes, got {len(key)}")
        views = [byte_view(np.ascontiguousarray(a)) for a in arrays]
        head = checked_head(self._fixed + key + self._table, views, self.mac_key)
        return ValueParts([memoryview(head), *views])

    def decode(self, data: bytes | bytearray | memoryview, key: bytes) -> list[np.ndarray]:
        """The arrays of a value, checked; raises
        :class:`~kvcore.errors.CorruptBlockError` / :class:`~kvcore.errors.ForeignBlockError`
        exactly as :func:`decode_block` would."""
        raw = data if isinstance(data, bytes) else bytes(memoryview(data)[:self._check_at])
        if (len(data) != self.value_len or not raw.startswith(self._fixed)
                or raw[len(self._fixed):len(self._fixed) + self.key_len] != key
                or raw[len(self._fixed) + self.key_len:self._check_at] != self._table):
            return decode_block(data, self.fingerprint, self.specs, key=key,
                                mac_key=self.mac_key)
        view = memoryview(data).cast("B")
        crc_at = self.header_len - _CRC.size
        if zlib.crc32(view[:crc_at]) != _CRC.unpack_from(view, crc_at)[0]:
            raise CorruptBlockError("header checksum mismatch")
        verify_payload(view, self.header_len, bytes(view[self._check_at:crc_at]), self.mac_key)
        if self._stacked:
            spec = self.specs[0]
            count = self.payload_len // spec.dtype.itemsize
            stacked = np.frombuffer(data, dtype=spec.dtype, count=count,
                                    offset=self.header_len)
            return list(stacked.reshape((len(self.specs), *spec.shape)))
        return arrays_from(data, self.header_len, self.specs)
