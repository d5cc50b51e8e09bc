"""Chain keys: equal to a plain reference, chained over the whole prefix, keyed, salted,
and refusing bad input before computing anything."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from kvcore.errors import BlockKeyError, KvCoreError
from kvcore.stores import DIGEST_SIZE, ROOT_PARENT, chain_keys, new_hash_key

KEY = bytes(range(32))


def reference(parent: bytes | None, rows: list[list[int]], extra: str | bytes | None,
              hash_key: bytes) -> list[bytes]:
    """The definition in the module docstring, one block at a time, no shortcuts."""
    previous = parent if parent is not None else bytes(16)
    extra_bytes = extra.encode() if isinstance(extra, str) else (extra or b"")
    out = []
    for row in rows:
        tokens = b"".join(struct.pack("<i", t) for t in row)
        message = (previous + struct.pack("<I", len(tokens)) + tokens
                   + struct.pack("<I", len(extra_bytes)) + extra_bytes)
        previous = hashlib.blake2b(message, digest_size=16, key=hash_key,
                                   person=b"kvcore.chain.v1").digest()
        out.append(previous)
    return out


@pytest.mark.parametrize("n, block_size", [(1, 1), (1, 16), (7, 4), (64, 16), (3, 128)])
@pytest.mark.parametrize("extra", [None, "tenant-a", b"\x00\xff"])
def test_chain_keys_equal_the_reference(n, block_size, extra):
    rng = np.random.default_rng(n * block_size)
    tokens = rng.integers(0, 2**31, (n, block_size), dtype=np.int64)
    got = chain_keys(None, tokens, extra, KEY)
    assert got == reference(None, tokens.tolist(), extra, KEY)
    assert all(len(d) == DIGEST_SIZE == 16 for d in got)


def test_extreme_token_ids_and_dtypes_agree():
    rows = [[0, 2**31 - 1, 1, 2**31 - 2]]
    expected = reference(None, rows, None, KEY)
    for dtype in (np.int32, np.int64, np.uint32, np.uint64):
        assert chain_keys(None, np.array(rows, dtype=dtype), None, KEY) == expected
    assert chain_keys(None, rows, None, KEY) == expected  # plain lists too
    big_endian = np.array(rows, dtype=">i4")
    assert chain_keys(None, big_endian, None, KEY) == expected
    strided = np.array([[0, 9, 2**31 - 1, 9, 1, 9, 2**31 - 2, 9]], dtype=np.int64)[:, ::2]
    assert chain_keys(None, strided, None, KEY) == expected


def test_a_key_names_the_whole_prefix_not_the_block():
    a = np.array([[1, 2], [3, 4]])
    b = np.array([[9, 9], [3, 4]])
    # Same second block, different first block: different second key.
    assert chain_keys(None, a, None, KEY)[1] != chain_keys(None, b, None, KEY)[1]


def test_continuing_from_a_parent_equals_one_long_chain():
    tokens = np.arange(40).reshape(10, 4)
    whole = chain_keys(None, tokens, "x", KEY)
    head = chain_keys(ROOT_PARENT, tokens[:6], "x", KEY)
    tail = chain_keys(head[-1], tokens[6:], "x", KEY)
    assert head + tail == whole


def test_salt_and_hash_key_separate_everything():
    tokens = np.arange(32).reshape(4, 8)
    base = chain_keys(None, tokens, "tenant-a", KEY)
    assert set(base).isdisjoint(chain_keys(None, tokens, "tenant-b", KEY))
    assert set(base).isdisjoint(chain_keys(None, tokens, "tenant-a", bytes(32)))
    assert set(base).isdisjoint(chain_keys(None, tokens, None, KEY))
    # None and empty mean "no salt"; str is its UTF-8 bytes.
    assert chain_keys(None, tokens, None, KEY) == chain_keys(None, tokens, "", KEY)
    assert chain_keys(None, tokens, "é", KEY) == chain_keys(None, tokens, "é".encode(), KEY)


def test_block_size_is_part_of_the_key():
    # The same 8 token ids as one block of 8 or two of 4 never share a key.
    flat = np.arange(8)
    assert chain_keys(None, flat.reshape(1, 8), None, KEY)[0] not in \
        chain_keys(None, flat.reshape(2, 4), None, KEY)


def test_a_salt_cannot_be_forged_from_token_bytes():
    # Length prefixes: moving bytes between the token field and the salt changes the key.
    tokens = np.array([[1, 2]])
    moved = np.array([[1]])
    assert chain_keys(None, tokens, None, KEY) != \
        chain_keys(None, moved, struct.pack("<I", 2), KEY)


def test_zero_blocks_give_no_keys():
    assert chain_keys(None, np.zeros((0, 16), dtype=np.int32), None, KEY) == []


def test_new_hash_key_is_random_and_usable():
    a, b = new_hash_key(), new_hash_key()
    assert len(a) == 32 and a != b
    assert len(chain_keys(None, [[1]], None, a)) == 1


@pytest.mark.parametrize("tokens, fragment", [
    (np.array([[-1, 0]]), "token id -1 is outside"),
    (np.array([[0, 2**31]]), "token id 2147483648 is outside"),
    (np.array([[0.0, 1.0]]), "must be integers"),
    (np.array([[True, False]]), "must be integers"),
    (np.array([1, 2, 3]), "got shape (3,)"),
    (np.zeros((2, 0), dtype=np.int32), "block_size >= 1"),
    ("abcd", "got str"),
    ([[1, 2], [3]], "integer array"),
    (np.array([["a", "b"]]), "must be integers"),
])
def test_bad_tokens_are_refused_by_name(tokens, fragment):
    with pytest.raises(BlockKeyError) as info:
        chain_keys(None, tokens, None, KEY)
    assert fragment in str(info.value)
    assert isinstance(info.value, (ValueError, KvCoreError))


@pytest.mark.parametrize("hash_key, fragment", [
    (b"short", "got 5 bytes"), (bytes(65), "got 65 bytes"), ("a" * 32, "got str"),
    (None, "got NoneType"),
])
def test_bad_hash_keys_are_refused(hash_key, fragment):
    with pytest.raises(BlockKeyError, match=fragment):
        chain_keys(None, [[1]], None, hash_key)


@pytest.mark.parametrize("parent, fragment", [
    (bytes(15), "got 15"), (bytes(32), "got 32"), ("00" * 16, "got str"),
])
def test_bad_parents_are_refused(parent, fragment):
    with pytest.raises(BlockKeyError, match=fragment):
        chain_keys(parent, [[1]], None, KEY)


def test_bad_extra_key_is_refused():
    with pytest.raises(BlockKeyError, match="extra_key must be str, bytes or None, got int"):
        chain_keys(None, [[1]], 7, KEY)
