"""The value format: bit-exact round trips, and every damaged, truncated or foreign
value refused with a typed error before anything is built from it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from kvcore.errors import BlockFormatError, CorruptBlockError, ForeignBlockError, StoreKeyError
from kvcore.stores import ArraySpec, decode_block, encode_block, encoded_size, peek_header
from kvcore.stores._codec import BlockCodec

FP = bytes(range(16))
KEY = bytes(range(100, 116))
MAC = bytes(range(32))
SHAPE = (2, 4, 2, 8)


def odd_bits(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Random bit patterns of ``dtype``, with -0.0, a subnormal and NaN payloads in."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    array = raw.view(dt).reshape(shape).copy()
    flat = array.reshape(-1)
    if dt == np.float16:
        flat[:4] = np.array([0x8000, 0x0001, 0x7E01, 0xFC03], dtype=np.uint16).view(np.float16)
    elif dt == np.float32:
        flat[:4] = np.array([0x80000000, 0x00000001, 0x7FC00001, 0xFF800003],
                            dtype=np.uint32).view(np.float32)
    return array


def layers(n: int = 3, dtype: object = np.float16) -> list[np.ndarray]:
    return [odd_bits(SHAPE, np.dtype(dtype), seed=i) for i in range(n)]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16, np.int8, np.float64])
@pytest.mark.parametrize("mac", [None, MAC])
def test_round_trip_is_bit_exact(dtype, mac):
    arrays = layers(3, dtype)
    value = encode_block(FP, arrays, key=KEY, mac_key=mac)
    out = decode_block(value, FP, [(SHAPE, dtype)] * 3, key=KEY, mac_key=mac)
    assert all(same_bits(a, b) for a, b in zip(arrays, out))
    assert len(value) == encoded_size([(SHAPE, dtype)] * 3, mac=mac is not None)
    codec = BlockCodec(FP, [(SHAPE, dtype)] * 3, mac_key=mac)
    assert codec.encode(KEY, arrays) == value  # the fast path writes the same bytes
    parts = codec.encode_parts(KEY, arrays)  # and the zero-copy form the same bytes
    assert parts.tobytes() == value and len(parts) == len(value)
    assert len(parts.parts) == 4  # the header, then each array's own memory, not a copy
    assert all(np.shares_memory(np.frombuffer(p, np.uint8), a)
               for p, a in zip(parts.parts[1:], arrays))
    assert all(same_bits(a, b) for a, b in zip(arrays, codec.decode(value, KEY)))


def test_decoded_arrays_are_views_of_the_value_not_copies():
    value = encode_block(FP, layers(), key=KEY)
    out = decode_block(value, FP, [(SHAPE, np.float16)] * 3, key=KEY)
    assert all(not a.flags.writeable and a.base is not None for a in out)


def test_mixed_shapes_dtypes_non_contiguous_and_zero_size_arrays():
    base = odd_bits((4, 6), np.float32)
    arrays = [base[:, ::2], odd_bits((3,), np.uint16), np.zeros((0, 5), np.float16),
              np.array(7, dtype=np.int64)]
    value = encode_block(FP, arrays)
    specs = [a.shape for a in arrays]
    out = decode_block(value, FP, [(s, a.dtype) for s, a in zip(specs, arrays)])
    assert all(same_bits(np.ascontiguousarray(a).reshape(a.shape), b) for a, b in zip(arrays, out))


def test_raw_bits_under_a_label_round_trip_and_stay_apart_from_the_real_dtype():
    # bfloat16 without ml_dtypes: uint16 patterns labelled "bfloat16".
    bits = odd_bits(SHAPE, np.uint16)
    value = encode_block(FP, [bits], key=KEY, labels=["bfloat16"])
    (out,) = decode_block(value, FP, [ArraySpec(SHAPE, np.dtype(np.uint16), "bfloat16")],
                          key=KEY)
    assert same_bits(bits, out)
    with pytest.raises(ForeignBlockError, match="bfloat16.*expected uint16"):
        decode_block(value, FP, [(SHAPE, np.uint16)], key=KEY)
    with pytest.raises(ForeignBlockError, match="expected float16"):
        decode_block(value, FP, [(SHAPE, np.float16)], key=KEY)


def test_dtypes_the_buffer_protocol_refuses_are_stored_as_raw_bytes():
    stamps = np.array([1, 2, 3], dtype="M8[s]")
    with pytest.raises((ValueError, TypeError)):
        memoryview(stamps)
    (out,) = decode_block(encode_block(FP, [stamps]), FP, [((3,), "M8[s]")])
    assert same_bits(stamps, out)


def test_nothing_is_pickled_the_header_is_the_documented_struct():
    value = encode_block(FP, layers(1), key=KEY)
    assert value[:4] == b"KVCB" and b"numpy" not in value and b"\x80\x04" not in value[:8]
    magic, version, flags, header_len, fp, payload_len, n, key_len, check_len = \
        struct.unpack_from("<4sHHI16sQHBB", value)
    assert (version, flags, fp, n, key_len, check_len) == (1, 0, FP, 1, 16, 4)
    assert payload_len == 2 * 4 * 2 * 8 * 2 and header_len + payload_len == len(value)
    assert value[40:56] == KEY
    (payload_crc,) = struct.unpack_from("<I", value, header_len - 8)
    assert payload_crc == zlib.crc32(value[header_len:])


# --- refusals ---------------------------------------------------------------------------

EXPECTED = [(SHAPE, np.float16)] * 3


def decoders(mac: bytes | None = None):
    codec = BlockCodec(FP, EXPECTED, mac_key=mac)
    return [lambda v: decode_block(v, FP, EXPECTED, key=KEY, mac_key=mac),
            lambda v: codec.decode(v, KEY)]


@pytest.mark.parametrize("mac", [None, MAC])
def test_every_single_bit_flip_is_refused(mac):
    value = bytearray(encode_block(FP, layers(), key=KEY, mac_key=mac))
    header_len = peek_header(bytes(value)).header_len
    # Every header bit, and a spread of payload bits.
    positions = [(i, b) for i in range(header_len) for b in range(8)]
    positions += [(i, i % 8) for i in range(header_len, len(value), 37)]
    for decode in decoders(mac):
        for i, bit in positions:
            value[i] ^= 1 << bit
            with pytest.raises(BlockFormatError):
                decode(bytes(value))
            value[i] ^= 1 << bit
        decode(bytes(value))  # and the undamaged value still decodes


@pytest.mark.parametrize("mac", [None, MAC])
def test_every_truncation_and_extension_is_corrupt(mac):
    value = encode_block(FP, layers(), key=KEY, mac_key=mac)
    for decode in decoders(mac):
        for cut in list(range(0, 200)) + list(range(200, len(value), 97)) + [len(value) - 1]:
            with pytest.raises(CorruptBlockError):
                decode(value[:cut])
        with pytest.raises(CorruptBlockError):
            decode(value + b"\x00")


def test_foreign_values_are_named_foreign():
    value = encode_block(FP, layers(), key=KEY)
    with pytest.raises(ForeignBlockError, match="layout fingerprint"):
        decode_block(value, bytes(16), EXPECTED, key=KEY)
    with pytest.raises(ForeignBlockError, match="written for block key"):
        decode_block(value, FP, EXPECTED, key=bytes(16))
    with pytest.raises(ForeignBlockError, match="holds 3 arrays, expected 2"):
        decode_block(value, FP, EXPECTED[:2], key=KEY)
    with pytest.raises(ForeignBlockError, match=r"array 0 is float16\[2\] \(2, 4, 2, 8\), "
                                                r"expected float16\[2\] \(2, 8, 2, 4\)"):
        decode_block(value, FP, [((2, 8, 2, 4), np.float16)] * 3, key=KEY)
    for decode in decoders():
        with pytest.raises(ForeignBlockError):
            decode(encode_block(bytes(16), layers(), key=KEY))


def test_mac_mode_is_never_downgraded_or_guessed():
    plain = encode_block(FP, layers(), key=KEY)
    signed = encode_block(FP, layers(), key=KEY, mac_key=MAC)
    with pytest.raises(ForeignBlockError, match="carries no MAC"):
        decode_block(plain, FP, EXPECTED, key=KEY, mac_key=MAC)
    with pytest.raises(ForeignBlockError, match="no mac_key was given"):
        decode_block(signed, FP, EXPECTED, key=KEY)
    with pytest.raises(CorruptBlockError, match="MAC mismatch"):
        decode_block(signed, FP, EXPECTED, key=KEY, mac_key=bytes(32))


def test_a_forged_value_with_a_valid_crc_but_no_mac_key_is_refused():
    # Someone who can write to the store but lacks the key rebuilds every checksum.
    forged = bytearray(encode_block(FP, layers(), key=KEY, mac_key=MAC))
    header_len = peek_header(bytes(forged)).header_len
    forged[header_len] ^= 0xFF
    forged[header_len - 4:header_len] = struct.pack("<I", zlib.crc32(forged[:header_len - 4]))
    with pytest.raises(CorruptBlockError, match="MAC mismatch"):
        decode_block(bytes(forged), FP, EXPECTED, key=KEY, mac_key=MAC)


def test_a_header_declaring_huge_sizes_is_refused_without_allocating():
    value = bytearray(encode_block(FP, [np.zeros((4,), np.uint8)]))
    header_len = peek_header(bytes(value)).header_len
    # Declare one array of 2**39 bytes (shape entry) and a matching payload length,
    # then fix the header CRC so only the size checks can catch it.
    table_at = 40
    label_len = value[table_at]
    dims_at = table_at + 1 + label_len + 2
    value[dims_at:dims_at + 8] = struct.pack("<Q", 2**39)
    value[28:36] = struct.pack("<Q", 2**39)
    value[header_len - 4:header_len] = struct.pack("<I", zlib.crc32(value[:header_len - 4]))
    with pytest.raises(CorruptBlockError, match="truncated"):
        decode_block(bytes(value), FP, [((2**39,), np.uint8)])


@pytest.mark.parametrize("data", [b"", b"KVCB", b"\x00" * 64, b"KVCB" + b"\xff" * 60])
def test_garbage_is_corrupt(data):
    with pytest.raises(CorruptBlockError):
        decode_block(data, FP, EXPECTED)


def test_unknown_version_and_flags_are_corrupt():
    value = bytearray(encode_block(FP, layers(1)))
    for offset, patch, fragment in [(4, b"\x02\x00", "format version 2"),
                                    (6, b"\x04\x00", "unknown flags")]:
        bad = bytearray(value)
        bad[offset:offset + 2] = patch
        with pytest.raises(CorruptBlockError, match=fragment):
            decode_block(bytes(bad), FP, [(SHAPE, np.float16)])


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: encode_block(b"short", [np.zeros(1)]), StoreKeyError, "fingerprint must be 16"),
    (lambda: encode_block(FP, [np.zeros(1)], key=bytes(65)), StoreKeyError, "at most 64"),
    (lambda: encode_block(FP, []), TypeError, "1..4096 numpy arrays"),
    (lambda: encode_block(FP, np.zeros((2, 2))), TypeError, "sequence of 1..4096"),
    (lambda: encode_block(FP, [[1.0, 2.0]]), TypeError, "got list"),
    (lambda: encode_block(FP, [np.zeros(2, dtype=object)]), TypeError, "no raw bytes"),
    (lambda: encode_block(FP, [np.zeros(2, dtype=">f4")]), TypeError, "big-endian"),
    (lambda: encode_block(FP, [np.zeros(1)], labels=["x", "y"]), TypeError, "2 entries"),
    (lambda: encode_block(FP, [np.zeros(1)], labels=["é"]), StoreKeyError, "ASCII"),
    (lambda: encode_block(FP, [np.zeros(1)], mac_key=b"k"), StoreKeyError, "16..64 bytes"),
    (lambda: decode_block(b"", FP, [("x", np.float16)]), StoreKeyError, "array spec"),
])
def test_bad_encode_arguments_are_typed_errors(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()
