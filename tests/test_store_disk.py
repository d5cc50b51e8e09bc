"""The disk store: survives restarts, atomic under concurrent writers in other
processes, sharded, private, bounded, and refusing directories that are not its own."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import kvcore
from kvcore.errors import StoreConfigError, StoreConnectionError
from kvcore.stores import DiskStore, StoreConnector, block_layout, chain_keys, open_store

HASH_KEY = b"disk-test-hash-key-0123456789abc"


def cfg() -> kvcore.CacheConfig:
    return kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32",
                              block_size=4, num_blocks=16)


def blocks_for(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s.shape).astype(s.dtype) for s in block_layout(cfg())]
            for _ in range(n)]


def test_values_survive_closing_and_reopening(tmp_path):
    url = f"file://{tmp_path}/s"
    with open_store(url) as store:
        store.put([("a", b"1"), ("b", b"2" * 100000)])
    with open_store(url) as store:
        assert store.get(["a", "b", "c"]) == [b"1", b"2" * 100000, None]


def test_a_new_connector_on_the_same_directory_finds_the_old_prefixes(tmp_path):
    url = f"file://{tmp_path}/cache"
    tokens = np.arange(40).reshape(10, 4)
    digests = chain_keys(None, tokens, None, HASH_KEY)
    blocks = blocks_for(10)
    with StoreConnector.open(url, cfg(), model_id="m") as first:
        first.offer(list(zip(digests, blocks)))
        assert first.flush(30)
    # "Restart": nothing shared with the first connector but the directory.
    with StoreConnector.open(url, cfg(), model_id="m") as second:
        run = second.fetch_run(chain_keys(None, tokens, None, HASH_KEY))
        assert len(run) == 10
        assert all(np.array_equal(a, b) for r, bl in zip(run, blocks) for a, b in zip(r, bl))
    with StoreConnector.open(url, cfg(), model_id="other-model") as other:
        assert other.fetch_run(digests) == []  # another model never sees them


def test_files_are_sharded_private_and_named_by_key(tmp_path):
    store = DiskStore(tmp_path / "s")
    keys = [f"k{i}" for i in range(300)]
    store.put([(k, b"v") for k in keys])
    shards = [p for p in (tmp_path / "s").iterdir() if p.is_dir()]
    assert 100 < len(shards) <= 256 and all(len(p.name) == 2 for p in shards)
    files = [f for p in shards for f in p.iterdir()]
    assert sorted(f.name for f in files) == sorted(keys)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in shards)
    assert store.disk_usage() == (300, 300)


def _writer(root: str, key: str, tag: int, rounds: int) -> None:
    store = DiskStore(root)
    payload = bytes([tag]) * (256 << 10)
    value = payload + zlib.crc32(payload).to_bytes(4, "little")
    for _ in range(rounds):
        store.put([(key, value)])


def test_concurrent_processes_writing_one_key_never_leave_a_torn_value(tmp_path):
    root = str(tmp_path / "s")
    DiskStore(root).close()
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(root, "shared", tag, 60)) for tag in (1, 2, 3)]
    for p in writers:
        p.start()
    reader = DiskStore(root)
    seen = set()
    while any(p.is_alive() for p in writers):
        (value,) = reader.get(["shared"])
        if value is not None:
            body, crc = value[:-4], int.from_bytes(value[-4:], "little")
            assert len(body) == 256 << 10 and zlib.crc32(body) == crc, "torn value read"
            assert len(set(body)) == 1
            seen.add(body[0])
    for p in writers:
        p.join()
        assert p.exitcode == 0
    assert seen  # the reader did see complete values while the writers ran
    leftovers = [f for f in Path(root).rglob(".tmp.*")]
    assert leftovers == []


def test_a_non_store_directory_is_refused_and_the_marker_checked(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(StoreConfigError, match="not empty and has no kvcore-store.json"):
        DiskStore(tmp_path / "home")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "kvcore-store.json").write_text('{"format": "kvcore-disk-store", '
                                                      '"version": 99}')
    with pytest.raises(StoreConfigError, match="version"):
        DiskStore(tmp_path / "s")
    (tmp_path / "s" / "kvcore-store.json").write_text("not json")
    with pytest.raises(StoreConfigError, match="not a kvcore store marker"):
        DiskStore(tmp_path / "s")


@pytest.mark.parametrize("url, fragment", [
    ("file://host/x", "names a host"), ("file:///", "absolute directory"),
    ("file://relative", "names a host"), ("file:///tmp/x?fsync=maybe", "fsync"),
    ("file:///tmp/x?bogus=1", r"unknown option\(s\) bogus"),
    ("file:///tmp/x?max_bytes=-1", "max_bytes"),
])
def test_bad_urls_are_refused(url, fragment):
    with pytest.raises(StoreConfigError, match=fragment):
        open_store(url)


@pytest.mark.parametrize("fsync, expected", [(False, 0), (True, 6)])
def test_fsync_policy_file_and_directory_only_when_asked(tmp_path, monkeypatch, fsync, expected):
    store = DiskStore(tmp_path / "s", fsync=fsync)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    store.put([("a", b"1"), ("b", b"2"), ("c", b"3")])
    assert len(calls) == expected  # per value: the file, then its directory
    assert store.get(["a", "b", "c"]) == [b"1", b"2", b"3"]


def test_url_round_trips_options(tmp_path):
    store = open_store(f"file://{tmp_path}/s?fsync=1&max_bytes=1000")
    assert store.url == f"file://{tmp_path}/s?fsync=1&max_bytes=1000"


def test_a_failed_write_is_a_store_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = DiskStore(tmp_path / "s")
    store.put([("warm", b"x")])

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(StoreConnectionError, match="No space left"):
        store.put([("k", b"v" * 10)])
    monkeypatch.undo()
    assert list((tmp_path / "s").rglob(".tmp.*")) == []
    assert store.get(["k", "warm"]) == [None, b"x"]


def test_an_unreadable_entry_is_a_store_error(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put([("k", b"v")])
    path = store._path("k")
    path.unlink()
    path.mkdir()  # a directory where the value file should be
    with pytest.raises(StoreConnectionError, match="reading k failed"):
        store.get(["k"])


def test_a_torn_file_is_a_counted_miss_and_is_deleted(tmp_path):
    url = f"file://{tmp_path}/s"
    tokens = np.arange(16).reshape(4, 4)
    digests = chain_keys(None, tokens, None, HASH_KEY)
    with StoreConnector.open(url, cfg()) as conn:
        conn.offer(list(zip(digests, blocks_for(4))))
        conn.flush(30)
        path = conn.store._path(conn.namespace.key(digests[1]))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # what a crash without fsync may leave
        assert len(conn.fetch_run(digests)) == 1
        conn.flush(30)
        stats = conn.stats()
        assert (stats.corrupt_values, stats.deleted_values, stats.errors) == (1, 1, 0)
        assert not path.exists()


def test_max_bytes_prunes_the_least_recently_used(tmp_path):
    store = DiskStore(tmp_path / "s", max_bytes=10 * 1000)
    store.put([("old", b"o" * 1000)])
    past = time.time() - 100
    os.utime(store._path("old"), (past, past))
    store.put([("read-again", b"r" * 1000)])
    os.utime(store._path("read-again"), (past + 1, past + 1))
    for i in range(6):
        store.put([(f"new{i}", b"n" * 1000)])
    assert store.disk_usage() == (8, 8000)  # under the bound: nothing pruned yet
    store.get(["read-again"])  # a read hit makes it the most recently used
    for i in range(6, 12):
        store.put([(f"new{i}", b"n" * 1000)])
    files, size = store.disk_usage()
    assert size <= 10 * 1000
    assert store.get(["old", "new0"]) == [None, None]  # the least recently used went
    assert store.get(["read-again", "new11"]) == [b"r" * 1000, b"n" * 1000]


def test_prune_removes_stale_temp_files_only(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put([("k", b"v")])
    shard = store._path("k").parent
    stale, fresh = shard / ".tmp.k.1.1", shard / ".tmp.k.2.2"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.prune() == 1
    assert not stale.exists() and fresh.exists() and store.get(["k"]) == [b"v"]


def test_short_writes_are_resumed_until_every_part_is_written(tmp_path, monkeypatch):
    from kvcore.stores import ValueParts
    store = DiskStore(tmp_path / "s")
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0][:3])]))
    value = ValueParts([memoryview(b"header"), memoryview(b""), memoryview(bytes(range(256)))])
    store.put([("k", value), ("b", b"plain bytes")])
    monkeypatch.undo()
    assert store.get(["k", "b"]) == [value.tobytes(), b"plain bytes"]
