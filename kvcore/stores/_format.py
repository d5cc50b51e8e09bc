"""The value format of a stored block: a fixed, versioned header, then raw bytes.

Never a pickle: a value is bytes that say what they are, checked before anything is
built from them.  All integers are little-endian::

    offset  size  field
    0       4     magic b"KVCB"
    4       2     format version (1)
    6       2     flags: bit 0 set = the payload check is a keyed MAC, else CRC-32
    8       4     header length H (every byte before the payload)
    12      16    layout fingerprint (StoreNamespace.fingerprint)
    28      8     payload length P
    36      2     number of arrays A (1..4096)
    38      1     block key length K (0..64)
    39      1     payload check length C (4 for CRC-32, 16 for the MAC)
    40      K     block key (the chain key the value was written under)
    ...     A x   array table: u8 dtype label length, label (ASCII), u8 itemsize,
                  u8 ndim, ndim x u64 dims
    ...     C     payload check: CRC-32 of the payload, or BLAKE2b-128 keyed with
                  mac_key over the header bytes before this field and the payload
    H-4     4     CRC-32 of every header byte before it
    H       P     the arrays' raw bytes, in table order, each C-contiguous

Decoding checks, in order and before touching the payload: length, magic, version,
header length bounds, the header CRC, the table (sizes that add up to ``P``, limits
on every count), then fingerprint, block key, MAC mode and the expected shapes and
dtypes (a mismatch is :class:`~kvcore.errors.ForeignBlockError`), then the total
length and the payload check (:class:`~kvcore.errors.CorruptBlockError`).  The arrays
it returns are views of ``data`` (read-only when it is ``bytes``): no copy.

CRC-32 (zlib, about 6 GB/s here) catches damage and truncation; it is not a defence
against someone who can write to the store.  A ``mac_key`` (derived from the
deployment's secret) makes every value authenticated: without the key nobody can
produce a value a reader accepts (BLAKE2b, about 1.3 GB/s here).
"""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptBlockError, ForeignBlockError, StoreKeyError

__all__ = ["ArraySpec", "FORMAT_VERSION", "MAGIC", "arrays_from", "byte_view", "checked_head",
           "decode_block", "encode_block", "encoded_size", "fixed_header", "peek_header", "seal",
           "table_entry", "verify_payload"]

MAGIC = b"KVCB"
FORMAT_VERSION = 1
_FLAG_MAC = 1
_FIXED = struct.Struct("<4sHHI16sQHBB")  # 40 bytes
_DIMS = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_MAC_SIZE = 16
_MAC_PERSON = b"kvcore.value.v1"
#: Limits a header must respect before anything is sized from it.
MAX_HEADER = 1 << 16
MAX_ARRAYS = 4096
MAX_NDIM = 8
MAX_LABEL = 32
MAX_PAYLOAD = 1 << 40


@dataclass(frozen=True)
class ArraySpec:
    """What one array of a block must be: ``shape``, the numpy ``dtype`` to return it
    as, and the ``label`` its dtype is recorded under (default ``dtype.name``).

    A label differing from the numpy dtype carries raw bits: a bfloat16 cache without
    ``ml_dtypes`` writes ``uint16`` views labelled ``"bfloat16"`` and reads them back
    as ``uint16``; a cache reading float16 never accepts them.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    label: str

    @classmethod
    def of(cls, spec: Any) -> ArraySpec:
        """An ArraySpec from itself, ``(shape, dtype)`` or ``(shape, dtype, label)``."""
        if isinstance(spec, ArraySpec):
            return spec
        try:
            shape, dtype, *rest = spec
            dt = np.dtype(dtype)
            label = rest[0] if rest else dt.name
            shape_t = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise StoreKeyError(f"an array spec is (shape, dtype[, label]), got {spec!r}: "
                                f"{exc}") from None
        if len(rest) > 1 or not isinstance(label, str):
            raise StoreKeyError(f"an array spec is (shape, dtype[, label]), got {spec!r}")
        return cls(shape_t, dt, label)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _label_bytes(label: str) -> bytes:
    try:
        raw = label.encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    if not 1 <= len(raw) <= MAX_LABEL:
        raise StoreKeyError(f"dtype label must be 1..{MAX_LABEL} ASCII characters, got "
                            f"{label!r}")
    return raw


def _native(array: Any, index: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array {index} must be a numpy.ndarray in host memory, got "
                        f"{type(array).__name__}")
    if array.dtype.hasobject or array.dtype.itemsize == 0 or array.dtype.fields:
        raise TypeError(f"array {index} has dtype {array.dtype}, which has no raw bytes "
                        "to store")
    order = array.dtype.byteorder
    if order == ">" or (order == "=" and sys.byteorder != "little"):
        raise TypeError(f"array {index} is big-endian ({array.dtype.str}); values are "
                        "little-endian")
    if array.ndim > MAX_NDIM:
        raise TypeError(f"array {index} has {array.ndim} dimensions, at most {MAX_NDIM}")
    # ascontiguousarray turns a 0-d array into shape (1,): keep the shape recorded.
    return np.ascontiguousarray(array).reshape(array.shape)


def encode_block(fingerprint: bytes, arrays: Sequence[np.ndarray], *, key: bytes = b"",
                 labels: Sequence[str | None] | None = None,
                 mac_key: bytes | None = None) -> bytes:
    """One block (or chunk) as a self-describing value.

    ``arrays`` is one host numpy array per layer (any shape, any fixed-size dtype,
    e.g. ``[2, block_size, heads, head_dim]``), copied once into the value.
    ``key`` is the chain key the value will be stored under (checked on read, so a
    value cannot be served under another key); ``labels`` overrides the recorded
    dtype label per array (see :class:`ArraySpec`); ``mac_key`` authenticates the
    value.  Raises ``TypeError`` / :class:`~kvcore.errors.StoreKeyError` for bad input.
    """
    if not isinstance(fingerprint, bytes) or len(fingerprint) != 16:
        raise StoreKeyError(f"fingerprint must be 16 bytes, got {fingerprint!r}")
    if not isinstance(key, (bytes, bytearray)) or len(key) > 64:
        raise StoreKeyError(f"block key must be at most 64 bytes, got {key!r}")
    if isinstance(arrays, np.ndarray) or not 1 <= len(arrays) <= MAX_ARRAYS:
        raise TypeError(f"arrays must be a sequence of 1..{MAX_ARRAYS} numpy arrays, got "
                        f"{type(arrays).__name__}")
    if labels is not None and len(labels) != len(arrays):
        raise TypeError(f"labels has {len(labels)} entries for {len(arrays)} arrays")
    blocks = [_native(a, i) for i, a in enumerate(arrays)]
    table = []
    payload_len = 0
    for i, a in enumerate(blocks):
        label = _label_bytes((labels[i] if labels is not None else None) or a.dtype.name)
        table.append(table_entry(label, a.dtype.itemsize, a.shape))
        payload_len += a.nbytes
    head = fixed_header(fingerprint, len(blocks), len(key), len(b"".join(table)), payload_len,
                        mac_key is not None) + bytes(key) + b"".join(table)
    return seal(head, [byte_view(a) for a in blocks], mac_key)


def table_entry(label: bytes, itemsize: int, shape: tuple[int, ...]) -> bytes:
    """One array's entry in the header's array table."""
    return struct.pack(f"<B{len(label)}sBB{len(shape)}Q", len(label), label, itemsize,
                       len(shape), *shape)


def fixed_header(fingerprint: bytes, n_arrays: int, key_len: int, table_len: int,
                 payload_len: int, mac: bool) -> bytes:
    """The first 40 bytes of a value."""
    check_len = _MAC_SIZE if mac else _CRC.size
    header_len = _FIXED.size + key_len + table_len + check_len + _CRC.size
    return _FIXED.pack(MAGIC, FORMAT_VERSION, _FLAG_MAC if mac else 0, header_len,
                       fingerprint, payload_len, n_arrays, key_len, check_len)


def byte_view(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes.  Through a numpy uint8 view: memoryview() refuses
    dtypes the buffer protocol does not know (ml_dtypes' bfloat16); this never does."""
    return memoryview(array.reshape(-1).view(np.uint8))


def seal(head: bytes, views: Sequence[memoryview], mac_key: bytes | None) -> bytes:
    """``head`` (fixed header, key, table) + payload check + header CRC + payload."""
    return b"".join([checked_head(head, views, mac_key), *views])


def checked_head(head: bytes, views: Sequence[memoryview], mac_key: bytes | None) -> bytes:
    """``head`` followed by the payload check of ``views`` and the header CRC: every
    byte of the value before the payload."""
    if mac_key is not None:
        mac = hashlib.blake2b(head, digest_size=_MAC_SIZE, key=_check_mac_key(mac_key),
                              person=_MAC_PERSON)
        for v in views:
            mac.update(v)
        check = mac.digest()
    else:
        crc = 0
        for v in views:
            crc = zlib.crc32(v, crc)
        check = _CRC.pack(crc)
    head += check
    head += _CRC.pack(zlib.crc32(head))
    return head


def encoded_size(specs: Sequence[Any], *, key_len: int = 16, mac: bool = False) -> int:
    """Bytes of a value holding arrays of ``specs`` (for sizing queues and budgets)."""
    parsed = [ArraySpec.of(s) for s in specs]
    table = sum(len(table_entry(_label_bytes(s.label), s.dtype.itemsize, s.shape))
                for s in parsed)
    check = _MAC_SIZE if mac else _CRC.size
    return _FIXED.size + key_len + table + check + _CRC.size + sum(s.nbytes for s in parsed)


def _check_mac_key(mac_key: object) -> bytes:
    if not isinstance(mac_key, (bytes, bytearray)):
        raise StoreKeyError(f"mac_key must be bytes, got {type(mac_key).__name__}")
    if not 16 <= len(mac_key) <= 64:
        raise StoreKeyError(f"mac_key must be 16..64 bytes, got {len(mac_key)} bytes")
    return bytes(mac_key)


@dataclass(frozen=True)
class _Header:
    flags: int
    header_len: int
    fingerprint: bytes
    payload_len: int
    key: bytes
    arrays: tuple[tuple[str, int, tuple[int, ...]], ...]  # (label, itemsize, shape)
    check: bytes


def peek_header(data: bytes | bytearray | memoryview) -> _Header:
    """Parse and bound-check a value's header without trusting anything in it.

    Raises :class:`~kvcore.errors.CorruptBlockError` for anything malformed; does not
    look at the payload, the fingerprint or the key."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size < _FIXED.size + _CRC.size:
        raise CorruptBlockError(f"value of {size} bytes is shorter than a block header")
    magic, version, flags, header_len, fingerprint, payload_len, n_arrays, key_len, \
        check_len = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptBlockError(f"value does not start with {MAGIC!r} (got {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(f"value has format version {version}, this kvcore reads "
                                f"version {FORMAT_VERSION}")
    if flags & ~_FLAG_MAC:
        raise CorruptBlockError(f"value has unknown flags {flags:#06x}")
    expected_check = _MAC_SIZE if flags & _FLAG_MAC else _CRC.size
    if check_len != expected_check:
        raise CorruptBlockError(f"payload check of {check_len} bytes, expected {expected_check}")
    if not _FIXED.size + key_len + check_len + _CRC.size <= header_len <= min(size, MAX_HEADER):
        raise CorruptBlockError(f"header length {header_len} is impossible for a value of "
                                f"{size} bytes")
    (stored_crc,) = _CRC.unpack_from(view, header_len - _CRC.size)
    if zlib.crc32(view[:header_len - _CRC.size]) != stored_crc:
        raise CorruptBlockError("header checksum mismatch")
    if not 1 <= n_arrays <= MAX_ARRAYS or key_len > 64 or payload_len > MAX_PAYLOAD:
        raise CorruptBlockError(f"header declares {n_arrays} arrays, a {key_len}-byte key, "
                                f"{payload_len} payload bytes")
    pos = _FIXED.size
    key = bytes(view[pos:pos + key_len])
    pos += key_len
    table_end = header_len - _CRC.size - check_len
    arrays = []
    total = 0
    try:
        for _ in range(n_arrays):
            label_len = view[pos]
            if not 1 <= label_len <= MAX_LABEL:
                raise CorruptBlockError(f"dtype label of {label_len} bytes")
            label = bytes(view[pos + 1:pos + 1 + label_len]).decode("ascii")
            pos += 1 + label_len
            itemsize, ndim = view[pos], view[pos + 1]
            pos += 2
            if itemsize == 0 or ndim > MAX_NDIM or pos + 8 * ndim > table_end:
                raise CorruptBlockError(f"array entry with itemsize {itemsize}, ndim {ndim}")
            shape = struct.unpack_from(f"<{ndim}Q", view, pos)
            pos += 8 * ndim
            nbytes = itemsize
            for d in shape:
                nbytes *= d
                if nbytes > MAX_PAYLOAD:
                    raise CorruptBlockError(f"array of shape {shape} is too large")
            total += nbytes
            arrays.append((label, itemsize, tuple(shape)))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptBlockError(f"array table is malformed: {exc}") from None
    if pos != table_end:
        raise CorruptBlockError(f"array table ends at byte {pos}, the header says {table_end}")
    if total != payload_len:
        raise CorruptBlockError(f"arrays add up to {total} bytes, the header says "
                                f"{payload_len}")
    check = bytes(view[table_end:table_end + check_len])
    return _Header(flags, header_len, bytes(fingerprint), payload_len, key, tuple(arrays),
                   check)


def decode_block(data: bytes | bytearray | memoryview, fingerprint: bytes,
                 expected: Sequence[Any], *, key: bytes | None = None,
                 mac_key: bytes | None = None) -> list[np.ndarray]:
    """The arrays of a value made by :func:`encode_block`, checked against what the
    reader expects.

    ``expected`` gives each array's :class:`ArraySpec` (or ``(shape, dtype[, label])``);
    ``key``, when given, must equal the block key recorded in the value; with
    ``mac_key`` only values authenticated with that key are accepted (and without it,
    authenticated values are refused: the reader cannot check them).  Returns
    views of ``data`` (read-only when ``data`` is ``bytes``).  Raises
    :class:`~kvcore.errors.CorruptBlockError` or
    :class:`~kvcore.errors.ForeignBlockError`, never anything sized from an unchecked
    header.
    """
    specs = [ArraySpec.of(s) for s in expected]
    header = peek_header(data)
    if header.fingerprint != fingerprint:
        raise ForeignBlockError(f"value has layout fingerprint {header.fingerprint.hex()}, "
                                f"expected {bytes(fingerprint).hex()}")
    if key is not None and header.key != bytes(key):
        raise ForeignBlockError(f"value was written for block key {header.key.hex() or '(none)'}"
                                f", read as {bytes(key).hex()}")
    has_mac = bool(header.flags & _FLAG_MAC)
    if has_mac != (mac_key is not None):
        raise ForeignBlockError("value is authenticated with a MAC but no mac_key was given"
                                if has_mac else "value carries no MAC but mac_key requires one")
    if len(header.arrays) != len(specs):
        raise ForeignBlockError(f"value holds {len(header.arrays)} arrays, expected "
                                f"{len(specs)}")
    for i, ((label, itemsize, shape), spec) in enumerate(zip(header.arrays, specs)):
        if label != spec.label or itemsize != spec.dtype.itemsize or shape != spec.shape:
            raise ForeignBlockError(f"array {i} is {label}[{itemsize}] {shape}, expected "
                                    f"{spec.label}[{spec.dtype.itemsize}] {spec.shape}")
    view = memoryview(data).cast("B")
    if len(view) != header.header_len + header.payload_len:
        raise CorruptBlockError(f"value is {len(view)} bytes, its header says "
                                f"{header.header_len + header.payload_len} (truncated?)")
    verify_payload(view, header.header_len, header.check, mac_key)
    return arrays_from(data, header.header_len, specs)


def verify_payload(view: memoryview, header_len: int, check: bytes,
                   mac_key: bytes | None) -> None:
    """Check the payload (everything after ``header_len``) against ``check``."""
    payload = view[header_len:]
    if mac_key is not None:
        mac = hashlib.blake2b(view[:header_len - _CRC.size - _MAC_SIZE],
                              digest_size=_MAC_SIZE, key=_check_mac_key(mac_key),
                              person=_MAC_PERSON)
        mac.update(payload)
        if mac.digest() != check:
            raise CorruptBlockError("MAC mismatch: the value was changed or written without "
                                    "this deployment's key")
    elif _CRC.pack(zlib.crc32(payload)) != check:
        raise CorruptBlockError("payload checksum mismatch")


def arrays_from(data: Any, offset: int, specs: Sequence[ArraySpec]) -> list[np.ndarray]:
    """The arrays of ``specs`` laid out one after another from ``offset`` in ``data``."""
    out = []
    for spec in specs:
        count = spec.nbytes // spec.dtype.itemsize
        if count == 0:  # frombuffer refuses an offset at the very end of the buffer
            out.append(np.empty(spec.shape, dtype=spec.dtype))
        else:
            out.append(np.frombuffer(data, dtype=spec.dtype, count=count, offset=offset)
                       .reshape(spec.shape))
        offset += spec.nbytes
    return out
