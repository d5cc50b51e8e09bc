"""Several threads driving one manager on the backend at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from kvcore.errors import OutOfBlocksError

from .._clauses import THREADS, ContractViolation, check_equal, fail
from ._base import ContractTests, covers
from ._harness import Harness
from .checks import settle

__all__ = ["ThreadSafetyContract"]

THREADS_N = 4


def _run_threads(work: Callable[[int], None], n: int = THREADS_N) -> None:
    """Run ``work(i)`` in ``n`` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"kvcore-conformance-{i}")
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if any(t.is_alive() for t in threads):
        fail(THREADS, "threads did not finish within 120 s (deadlock?)")
    if errors:
        first = errors[0]
        if isinstance(first, ContractViolation):
            raise first
        fail(THREADS, f"a thread raised {type(first).__name__}: {first}")


class ThreadSafetyContract(ContractTests):
    """Concurrent allocate / write / read / fork / deallocate keep every sequence's data."""

    @covers(THREADS)
    def test_concurrent_sequences_keep_their_own_data(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=256)
        rounds = 12

        def work(i: int) -> None:
            local = Harness(h.backend, h.dtype, h.device, seed=100 + i)
            local.heads, local.dim = h.heads, h.dim
            for r in range(rounds):
                handle = local.allocate(mgr, f"t{i}-{r}", 3 + r % 5)
                data = local.fill(mgr, handle)
                for _ in range(3):
                    mgr.extend(handle, 2)
                    for layer in data:
                        k, v = local.kv(2), local.kv(2)
                        local.write(mgr, handle, layer, k, v)
                        data[layer] = (np.concatenate([data[layer][0], k]),
                                       np.concatenate([data[layer][1], v]))
                child = mgr.fork(handle, f"t{i}-{r}-child")
                for layer, (k, v) in data.items():
                    local.expect_kv(THREADS, handle, layer, k, v, f"thread {i} round {r}")
                    local.expect_kv(THREADS, child, layer, k, v, f"thread {i} round {r} fork")
                mgr.deallocate(handle)
                mgr.deallocate(child)

        _run_threads(work)
        stats = settle(mgr)
        check_equal((stats.used_blocks, len(mgr)), (0, 0), THREADS,
                    "(used blocks, live caches) after every thread freed its caches")

    @covers(THREADS)
    def test_batched_decode_while_other_threads_allocate(self, kvcore_default_harness: Harness) -> None:
        h = kvcore_default_harness
        mgr = h.manager(num_blocks=128)
        batch = [h.allocate(mgr, f"dec{i}", 2) for i in range(4)]
        data = {hd.request_id: h.fill(mgr, hd) for hd in batch}
        steps = 10

        def work(i: int) -> None:
            if i == 0:  # the decode loop
                for _ in range(steps):
                    mapping = mgr.extend_batch(batch, 1)
                    for layer in range(mgr.config.num_layers):
                        k, v = h.kv(len(batch)), h.kv(len(batch))
                        mgr.write_slots(layer, mapping, h.native(k), h.native(v))
                        for j, hd in enumerate(batch):
                            old = data[hd.request_id][layer]
                            data[hd.request_id][layer] = (np.concatenate([old[0], k[j:j + 1]]),
                                                          np.concatenate([old[1], v[j:j + 1]]))
                return
            local = Harness(h.backend, h.dtype, h.device, seed=200 + i)
            local.heads, local.dim = h.heads, h.dim
            for r in range(15):  # churn: allocate, write, read, free
                try:
                    handle = local.allocate(mgr, f"churn{i}-{r}", 5)
                except OutOfBlocksError:
                    continue
                written = local.fill(mgr, handle)
                local.expect_kv(THREADS, handle, 0, *written[0], f"churn thread {i}")
                mgr.deallocate(handle)

        _run_threads(work)
        for hd in batch:
            for layer, (k, v) in data[hd.request_id].items():
                h.expect_kv(THREADS, hd, layer, k, v, "decoded while other threads churned")
        settle(mgr)
