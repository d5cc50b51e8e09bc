"""The contract, clause by clause, and the assertions that name a clause when it breaks.

Every check in the suite goes through :func:`check`, :func:`expect_raises` or
:func:`kvcore_conformance._data.assert_same_bits`, so a failure always reads::

    contract clause [backend.gather.order] broken: gather(layer, kv, slots) returns row i
    from slot slots[i] ...
      seen:     ...
      expected: ...

The clause ids are stable: the broken-backend tests of kvcore match on them, the
end-of-run table and ``--json`` report list them, and a backend author can grep
:data:`CLAUSES` (or the guide) for the full text.

Adding a clause: define it here with :func:`define` in the section it belongs to (the
order of :data:`CLAUSES` is the order the report lists clauses in, and should be the
order the tests run in), write a test marked ``@covers(CLAUSE)`` in a contract class,
list the clause in ``docs/writing-a-backend.md`` section 6 (a test checks the guide
lists every clause), and plant a bug in kvcore's ``tests/conformance_backends`` that
only this clause catches.  A new area of the suite may define its clauses in its own
module with :func:`define`; they join the report once that module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

__all__ = ["CLAUSES", "Clause", "ContractViolation", "blame", "check", "clause", "define",
           "expect_raises", "fail"]


@dataclass(frozen=True)
class Clause:
    """One promise of the backend contract."""

    id: str
    text: str

    def __str__(self) -> str:
        return f"[{self.id}] {self.text}"


class ContractViolation(AssertionError):
    """A backend broke a clause of the contract.  ``clause`` says which."""

    def __init__(self, clause: Clause, detail: str) -> None:
        super().__init__(f"contract clause [{clause.id}] broken: {clause.text}\n{detail}")
        self.clause = clause


CLAUSES: dict[str, Clause] = {}


def define(id: str, text: str) -> Clause:
    """Register the clause ``id`` (a dotted lower-case name, ``area.promise``) with its
    one-sentence ``text``; defining an id twice with another text is an error."""
    known = CLAUSES.get(id)
    if known is not None:
        if known.text != text:
            raise ValueError(f"contract clause {id!r} is already defined as {known.text!r}")
        return known
    item = Clause(id, text)
    CLAUSES[id] = item
    return item


_c = define


# Clauses are listed in the order a backend author should fix them: what every later
# test relies on first (identity, pools, array conversions), then the bulk operations
# on ordinary values, then exact bit patterns, then everything the manager builds on
# top.  The suite runs its tests in the same order, so the first failure of a run
# names the operation at fault; the end-of-run table lists the clauses in this order.

# --- the backend itself -----------------------------------------------------------------
BACKEND_IDENTITY = _c("backend.identity", "a backend names itself, its array library, the "
                      "KVCORE_API_VERSION it implements and a PagedKvCacheHandle subclass; "
                      "kvcore.get_backend(name) for the name it is registered under returns "
                      "it with that very name, and its managers hand out exactly that class")
CAPS_WELL_FORMED = _c("capabilities.well-formed", "capabilities() returns a BackendCapabilities "
                      "whose declared and unsupported dtypes do not overlap, declaring at least "
                      "one dtype and one device type, the default device among them")
CAPS_REFUSE_UNDECLARED = _c("capabilities.refuse-undeclared", "a dtype or device the backend "
                            "does not declare is refused with UnsupportedError naming it")

# --- pools and arrays -------------------------------------------------------------------
ALLOCATE_LAYER = _c("backend.allocate-layer", "allocate_layer returns a zero-filled [planes, "
                    "num_blocks, block_size, heads, head_dim] array of the dtype and device "
                    "asked, for planes=2 (K/V) and planes=1")
FRESH_POOLS = _c("backend.fresh-pools", "every allocate_layer call returns new zero-filled "
                 "memory: a pool allocated after another was written and released reads all "
                 "zeros, and writes to one pool (or one manager) never show in another")
RELEASE_LAYER = _c("backend.release-layer", "release_layer accepts every pool the backend "
                   "handed out (planes 1 and 2, every device and swap device, pinned) and "
                   "leaves every other pool as it was")
DESCRIBE = _c("backend.describe", "describe(array) reports the array's true shape, dtype and "
              "device; an array of a dtype kvcore does not hold (int16, uint16, int32) has "
              "dtype None, never the float of the same width")
NUMPY_ROUNDTRIP = _c("backend.numpy-roundtrip", "to_numpy(from_numpy(x)) gives x back bit for "
                     "bit (bfloat16 widened to float32)")
FROM_NUMPY = _c("backend.from-numpy", "from_numpy(x, dtype) returns a new array of the "
                "requested dtype even when x has another dtype; values the dtype can "
                "represent arrive exactly, and later changes to x do not reach it")
TO_NUMPY = _c("backend.to-numpy", "to_numpy returns an independent host copy (float16, or "
              "float32 for float32 and bfloat16): a later scatter into the pool does not "
              "change it, and changing it does not change the pool")
INDEX_ARRAY = _c("backend.index-array", "index_array accepts int64 indices of any shape and "
                 "returns an index that does not alias them: changing the numpy array "
                 "afterwards changes nothing")
ASARRAY = _c("backend.asarray", "asarray returns the backend's own arrays as the very same "
             "object, never changes a dtype (integer arrays are refused with "
             "DtypeMismatchError or passed through as integers), and raises TypeError for "
             "non-arrays")
ASARRAY_DLPACK = _c("backend.asarray.dlpack", "asarray imports other DLPack producers without "
                    "a copy (the result shares their memory) and raises TypeError, with the "
                    "reason, when the export fails")
ASARRAY_DEVICE = _c("backend.asarray.device", "asarray of an array on another device (judged "
                    "by __dlpack_device__) raises DeviceMismatchError naming both devices")
RETURNS_POOL = _c("backend.returns-pool", "scatter, copy_blocks, transfer_blocks and their "
                  "*_layers forms return the pool now holding the data, with the pool's "
                  "shape, dtype and device (callers continue with what is returned)")
MUTABLE_POOLS = _c("capabilities.mutable-pools", "with mutable_pools=True every operation "
                   "changes the pool in place and returns the very same object, so a "
                   "layer_pool view sees later writes; either way layer_pool called again "
                   "holds the latest data")

# --- bulk operations on ordinary values ---------------------------------------------------
SCATTER = _c("backend.scatter", "scatter writes rows[p][i] to slot slots[i] of plane p, for "
             "slots in any order (reversed, blocks out of order, one row, one block, the "
             "whole pool), and touches no other slot")
SCATTER_OVERWRITE = _c("backend.scatter.overwrite", "a second scatter to the same slots "
                       "replaces what the first wrote, bit for bit (set, never add or blend)")
GATHER_ORDER = _c("backend.gather.order", "gather(pool, plane, slots) returns row i from slot "
                  "slots[i], in the order given (a sequence's tokens in logical order, not "
                  "sorted by physical slot), for runs of any shape: blocks out of order, "
                  "slots reversed inside a block, one row, one block, the whole pool")
GATHER_SHAPE = _c("backend.gather.shape", "gather accepts an index of any shape and returns "
                  "slots.shape + (heads, head_dim), element [i, j] from slot slots[i, j]")
GATHER_COPY = _c("backend.gather.copy", "gather returns a new array: later writes to the pool "
                 "do not change what an earlier gather returned")
GATHER_BLOCKS = _c("backend.gather-blocks", "gather_blocks, where a backend provides it, "
                   "returns blocks.shape + (block_size, heads, head_dim): element [i, j] is "
                   "block blocks[i, j] of the plane, whole, in the order given (repeats "
                   "allowed), as a new array later writes to the pool do not change")
COPY_BLOCKS = _c("backend.copy-blocks", "copy_blocks copies whole blocks src[i] -> dst[i] in "
                 "every plane, in any order, leaving the sources and every other block "
                 "unchanged")
TRANSFER_BLOCKS = _c("backend.transfer-blocks", "transfer_blocks copies blocks between pools "
                     "(possibly on different devices) bit-identically in every plane, in any "
                     "order, touching no other block of the destination")
LARGE_POOL = _c("backend.large-pool", "pools of more than 2**16 slots are addressed in full: "
                "writes, reads and block copies at the top slots land exactly there (no "
                "16-bit index wrap-around)")
PLANES = _c("backend.planes", "one-plane pools (planes=1) work like K/V pools: scatter of one "
            "row set, gather of plane 0, copy_blocks and transfer_blocks")
LAYER_FORMS = _c("backend.layer-forms", "scatter_layers, copy_blocks_layers and "
                 "transfer_blocks_layers return one pool per layer holding exactly what the "
                 "per-layer operations give")
FRESH_READS = _c("backend.fresh-reads", "a read after scatter, copy_blocks, transfer_blocks "
                 "or a swap-in sees the new data: whatever a backend caches is never served "
                 "stale")
PINNED = _c("capabilities.pinned-memory", "a backend declaring pinned_memory allocates a usable "
            "host layer when asked for pinned=True")

# --- exact bit patterns through every route ---------------------------------------------------
_BITS = ("-0.0, subnormals, the largest finite values, infinities and NaNs with payloads "
         "(quiet and signalling)")
BITS_NUMPY = _c("bits.numpy-roundtrip", f"from_numpy and to_numpy carry {_BITS} bit for bit "
                "in every declared dtype")
BITS_SCATTER_GATHER = _c("bits.scatter-gather", f"scatter and gather carry {_BITS} bit for bit")
BITS_COPY_BLOCKS = _c("bits.copy-blocks", f"copy_blocks carries {_BITS} bit for bit")
BITS_TRANSFER = _c("bits.transfer-blocks", f"transfer_blocks to every swap device and back "
                   f"carries {_BITS} bit for bit")
BITS_MANAGER = _c("bits.manager", f"the manager's write, read, copy-on-write and swap carry "
                  f"{_BITS} bit for bit")
BITS_DLPACK = _c("bits.dlpack", f"DLPack exports of reads and of layer_pool carry {_BITS} bit "
                 "for bit")

# --- block tables -----------------------------------------------------------------------
TABLE_ARITHMETIC = _c("table.arithmetic", "a block table holds ceil(tokens / block_size) "
                      "blocks and its free_tokens, has_free_space, capacity and "
                      "blocks_needed_for_length agree with that")
TABLE_BLOCKS = _c("table.blocks", "a sequence's physical blocks are distinct ids inside the "
                  "pool")
TABLE_SNAPSHOT = _c("table.snapshot", "block_table() is a snapshot: changing it changes nothing")
TABLE_MUT = _c("table.mut", "block_table_mut() refuses add_blocks and grows through the manager "
               "on extend_sequence")
TABLE_ERRORS = _c("table.errors", "BlockTable refuses overfilling with CapacityError and bad "
                  "arguments with TypeError / ValueError")

# --- handles --------------------------------------------------------------------------
HANDLE_SHAPE = _c("handle.shape", "a handle reports the config's device, num_layers, "
                  "num_kv_heads and head_dim")
HANDLE_AS_ANY = _c("handle.as-any", "as_any() returns the handle, as_any(cls) checks the class "
                   "and raises TypeError for a class it is not")
HANDLE_READ = _c("handle.read", "key_cache / value_cache / kv_cache return exactly the tokens "
                 "written, [tokens, heads, head_dim], in logical order, with the cache's dtype "
                 "and device; None before any write")
HANDLE_LAYER_RANGE = _c("handle.layer-range", "a layer outside 0 <= layer < num_layers raises "
                        "LayerIndexError (a non-int layer TypeError), never returns data")
HANDLE_CLONE = _c("handle.clone", "clone_handle() is a second reference to the same cache: "
                  "same cache_id, same data, no copy")
HANDLE_IDS = _c("handle.cache-id", "cache_id() is stable for a cache and differs between caches")
HANDLE_VALIDITY = _c("handle.validity", "after deallocate, is_valid() is False on every handle "
                     "to the cache and every data access raises InvalidHandleError")
HANDLE_STATS = _c("handle.stats", "stats() is a valid CacheHandleStats that matches the block "
                  "table: tokens, blocks, bytes, utilization")
DLPACK = _c("dlpack.export", "arrays the cache returns export DLPack on the cache's device; "
            "importing them gives the cached data")

# --- the manager on this backend ----------------------------------------------------------
ALLOCATE = _c("manager.allocate", "allocate reserves ceil(n / block_size) blocks and returns "
              "the backend's handle class; can_allocate agrees with it")
ALLOCATE_ATOMIC = _c("manager.atomic", "a refused operation raises its typed error and leaves "
                     "the cache exactly as it was")
WRITE_READ = _c("manager.write-read", "what is written is read back bit for bit, per layer, "
                "in logical order")
WRITE_DTYPE = _c("manager.no-silent-cast", "writing an array of another dtype (another "
                 "float, or int16 / uint16 / int32) raises DtypeMismatchError and changes "
                 "nothing: the cache never casts silently")
WRITE_ERRORS = _c("manager.write-errors", "bad writes raise typed errors (shape, capacity, "
                  "write order, non-array) and change nothing")
EXTEND = _c("manager.extend", "extend / extend_batch reserve slots in logical order and "
            "write_slots writes exactly there")
FORK_COW = _c("manager.fork-cow", "a forked child shares its parent's data until one side "
              "writes; then only the writer changes (copy-on-write)")
DEALLOCATE = _c("manager.deallocate", "deallocate returns blocks to the pool once nothing "
                "holds them; deallocating twice raises")
PREFIX_SHARING = _c("manager.prefix-sharing", "a request whose prompt repeats a cached prefix "
                    "shares its full blocks and reads the K/V written for them")
EVICTION = _c("manager.eviction", "unreferenced prefix-cached blocks are evicted (LRU) when "
              "space is needed and by gc(); evicted prefixes are no longer hit")
SWAP = _c("manager.swap", "swap_out / swap_in move a sequence to the swap device and back "
          "bit-identically; while out, data access raises HandleSwappedError")
STATS = _c("stats.valid", "manager stats are valid, JSON round-trip, and agree with the tables "
           "(free + cached + used == total, used == distinct blocks held)")
PAGE_TABLES = _c("manager.page-tables", "flashinfer_page_table / vllm_block_table / "
                 "layer_pool describe exactly the blocks and data the tables hold")
INVARIANTS = _c("manager.invariants", "check_invariants() passes after every operation: "
                "refcounts equal table holdings, no block is both free and used")
THREADS = _c("threads.safe", "the manager on this backend is safe to call from several threads")
STATEFUL = _c("stateful.dense-reference", "random sequences of operations read back exactly "
              "what a dense reference model holds, and freeing everything restores the pool")

# --- layer groups (the manager and backend on every group kind) -------------------------
GROUPS_SLIDING = _c(
    "groups.sliding-window", "a sequence in a sliding-window group holds at most "
    "ceil(window / block_size) + 1 blocks of it however long it grows, its reads return "
    "exactly the tokens from first_position on (the whole window at least), the stats count "
    "the blocks given back, and fork, copy-on-write and swap keep the window bit for bit")
GROUPS_LATENT = _c(
    "groups.latent", "a latent (MLA) layer keeps one vector of latent_dim per token: written "
    "as key with value=None and read back as [tokens, 1, latent_dim] bit for bit (value_cache "
    "None) through decode steps, fork, copy-on-write, swap and prefix sharing")
GROUPS_KV_WIDTHS = _c(
    "groups.kv-widths", "a layer whose V is narrower than K keeps one pool per plane "
    "(layer_pools): K and V of their own widths are read back bit for bit through decode "
    "steps, fork, copy-on-write, swap and prefix sharing")
GROUPS_CROSS = _c(
    "groups.cross", "a cross-attention layer holds the encoder tokens reserved at allocation, "
    "written once with write(start=...) and read back bit for bit (kv_cache too) while the "
    "decoder grows, through forks; decode slot mappings and writes past the reservation are "
    "refused with typed errors")

# --- quantized codecs --------------------------------------------------------------------
CODEC_STORAGE = _c(
    "codec.storage", "a backend declaring uint8 or int8 holds pools of them (planes 2 and "
    "1, zero-filled) whose scatter, gather, copy_blocks and transfer_blocks carry all 256 "
    "byte values bit for bit, and float32 pools one element wide (a codec's scales) as any "
    "float32 pool")
CODEC_ROUND_TRIP = _c(
    "codec.round-trip", "a cache of each served codec reads back, in its compute dtype and "
    "shape, every finite element within the codec's declared error bound of what was "
    "written (through write and decode-step write_slots), and every element of a (token, "
    "head) row holding an infinity or NaN as NaN")
CODEC_CODES = _c(
    "codec.codes-exact", "a codec cache's reads are the codec's decode of the codes and "
    "scales layer_pools shows (bit for bit, NaN as NaN), and copy-on-write, prefix sharing "
    "and swap carry codes and scales bit for bit: reads after them equal the reads before")


def clause(id: str) -> Clause:
    """The clause called ``id`` (``KeyError`` names the known ones)."""
    try:
        return CLAUSES[id]
    except KeyError:
        raise KeyError(f"no contract clause {id!r}; known: {', '.join(sorted(CLAUSES))}") from None


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 400 else text[:400] + " ..."


def fail(item: Clause, detail: str, *, seen: Any = ..., expected: Any = ...) -> NoReturn:
    """Raise :class:`ContractViolation` for ``item``, showing what was seen and expected."""
    lines = [f"  {detail}"] if detail else []
    if seen is not ...:
        lines.append(f"  seen:     {_fmt(seen)}")
    if expected is not ...:
        lines.append(f"  expected: {_fmt(expected)}")
    raise ContractViolation(item, "\n".join(lines))


def check(condition: bool, item: Clause, detail: str, *, seen: Any = ...,
          expected: Any = ...) -> None:
    """:func:`fail` unless ``condition`` holds."""
    if not condition:
        fail(item, detail, seen=seen, expected=expected)


def check_equal(seen: Any, expected: Any, item: Clause, detail: str) -> None:
    """:func:`fail` unless ``seen == expected``."""
    if seen != expected:
        fail(item, detail, seen=seen, expected=expected)


def expect_raises(item: Clause, expected: type[BaseException] | tuple[type[BaseException], ...],
                  call: Callable[[], Any], detail: str) -> BaseException:
    """Run ``call``; it must raise ``expected``.  Returns the exception."""
    names = (" or ".join(e.__name__ for e in expected) if isinstance(expected, tuple)
             else expected.__name__)
    try:
        result = call()
    except expected as exc:
        return exc
    except Exception as exc:  # noqa: BLE001  (the wrong error is a violation too)
        fail(item, f"{detail}: raised the wrong error",
             seen=f"{type(exc).__name__}: {exc}", expected=names)
    fail(item, f"{detail}: nothing was raised", seen=f"returned {_fmt(result)}",
         expected=f"{names} raised")


class blame:
    """Report any exception other than a :class:`ContractViolation` (or pytest's
    outcomes) raised inside the block as a violation of ``item``: the backend operation
    called there broke it, whatever test it is part of."""

    def __init__(self, item: Clause, what: str) -> None:
        self.item = item
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or isinstance(exc, ContractViolation) or not isinstance(exc, Exception):
            return False  # pytest's skip/fail outcomes are BaseExceptions: let them through
        raise ContractViolation(self.item, f"  {self.what} raised {type(exc).__name__}: "
                                           f"{exc}") from exc
