"""The contract, clause by clause, and the assertions that name a clause when it breaks.

Every check in the suite goes through :func:`check`, :func:`expect_raises` or
:func:`kvcore_conformance._data.assert_same_bits`, so a failure always reads::

    contract clause [backend.gather.order] broken: gather(layer, kv, slots) returns row i
    from slot slots[i] ...
      seen:     ...
      expected: ...

The clause ids are stable: the broken-backend tests of kvcore match on them, and a
backend author can grep :data:`CLAUSES` (or the guide) for the full text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["CLAUSES", "Clause", "ContractViolation", "check", "clause", "expect_raises",
           "fail"]


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


def _c(id: str, text: str) -> Clause:
    item = Clause(id, text)
    CLAUSES[id] = item
    return item


# --- the backend itself ---------------------------------------------------------------
BACKEND_IDENTITY = _c("backend.identity", "a backend names itself, its array library, the "
                      "KVCORE_API_VERSION it implements and a PagedKvCacheHandle subclass")
CAPS_WELL_FORMED = _c("capabilities.well-formed", "capabilities() returns a BackendCapabilities "
                      "whose declared and unsupported dtypes do not overlap, declaring at least "
                      "one dtype and one device type")
CAPS_REFUSE_UNDECLARED = _c("capabilities.refuse-undeclared", "a dtype or device the backend "
                            "does not declare is refused with UnsupportedError naming it")
ALLOCATE_LAYER = _c("backend.allocate-layer", "allocate_layer returns a zero-filled [2, "
                    "num_blocks, block_size, heads, head_dim] array of the dtype and device asked")
DESCRIBE = _c("backend.describe", "describe(array) reports the array's true shape, dtype and device")
NUMPY_ROUNDTRIP = _c("backend.numpy-roundtrip", "to_numpy(from_numpy(x)) gives x back bit for "
                     "bit (bfloat16 widened to float32)")
ASARRAY = _c("backend.asarray", "asarray passes native arrays through without copying or "
             "changing the dtype, and raises TypeError for non-arrays")
SCATTER = _c("backend.scatter", "scatter writes key[i] / value[i] to slot slots[i] and touches "
             "no other slot")
GATHER_ORDER = _c("backend.gather.order", "gather(layer, kv, slots) returns row i from slot "
                  "slots[i], in the order given (a sequence's tokens in logical order, not "
                  "sorted by physical slot)")
GATHER_COPY = _c("backend.gather.copy", "gather returns a new array: later writes to the pool "
                 "do not change what an earlier gather returned")
COPY_BLOCKS = _c("backend.copy-blocks", "copy_blocks copies whole blocks src[i] -> dst[i], K "
                 "and V, leaving the sources and every other block unchanged")
TRANSFER_BLOCKS = _c("backend.transfer-blocks", "transfer_blocks copies blocks between pools "
                     "(possibly on different devices) bit-identically, K and V")
PINNED = _c("capabilities.pinned-memory", "a backend declaring pinned_memory allocates a usable "
            "host layer when asked for pinned=True")

# --- block tables ---------------------------------------------------------------------
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
WRITE_DTYPE = _c("manager.no-silent-cast", "writing an array of another dtype raises "
                 "DtypeMismatchError: the cache never casts silently")
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
