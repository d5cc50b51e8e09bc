"""No sequence ever reads K/V it did not write or share through an identical prefix
(issue 10), tried the way an independent tester would.

Long random runs drive the public API (allocate with shared and crafted prompts,
salts, ``allow_full_hit`` and ``join_pending``; extend with and without token ids;
decode steps through ``extend_batch`` + ``write_slots``; writes and overwrites;
fork, clone, truncate, swap, gc, ``reset_prefix_cache``, deallocate) and keep
reusing old slot mappings, deallocated handles, request ids and another manager's
mappings and handles on purpose.  A dense per-request reference
(:mod:`tests._diff_model`) predicts every read; reads are compared as raw bits with
``-0.0``, subnormals and NaN payloads in the data, ``check_invariants()`` runs after
every operation, and every refusal must be the documented error and change nothing
(:mod:`tests._observe`).

The planted-fault tests at the end prove the run fails when the copy-on-write check of
``write_slots`` is removed, when prefix verification trusts a weak own-tokens key, and
when salts stop separating tenants.

The same runs on keys forced to collide prove that a collision costs hits, never data.

Profiles: CI runs 2 seeds x 10,000 operations per backend.  ``KVCORE_THOROUGH=1``
runs 8 seeds x 50,000 and a longer hypothesis search (see docs/trust.md).
"""

from __future__ import annotations

import os
from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcore._coordinator as coordinator
import kvcore._writes as writes
from kvcore._chain_hash import ChainHasher
from kvcore._prefix_index import PrefixIndex

from . import _diff_model as model
from . import _diff_ops as ops
from . import _diff_scenarios as scenarios
from ._diff_driver import Driver, run_differential
from ._diff_model import DifferentialFailure, HypothesisChoices
from ._planted_faults import (allow_every_write, constant_key, lookup_own_tokens_only,
                              own_tokens_key)

# torch is part of the CI install: the import above fails the module if it is missing,
# and the torch runs below are never skipped.
assert torch.__version__

THOROUGH = os.environ.get("KVCORE_THOROUGH", "") not in ("", "0")
SEEDS = tuple(range(1, 9)) if THOROUGH else (1, 2)
OPERATIONS = 50_000 if THOROUGH else 10_000
BACKENDS = ("numpy", "torch")


def _assert_it_exercised_everything(counts: Counter[str], operations: int) -> None:
    """A run that never shares a prefix or never reuses a stale mapping proves little:
    floors, per 10,000 operations, well under what a run does (about a third)."""
    scale = operations / 10_000
    floors = {
        "prefix-hit": 60, "join-pending": 50, "reuse:accepted": 50, "reuse:refused": 300,
        "refused:StaleSlotMappingError": 250, "refused:WriteOrderError": 150,
        "refused:OutOfBlocksError": 10, "refused:InvalidHandleError": 150,
        "refused:UnknownRequestError": 100, "refused:PendingPrefixError": 100,
        "refused:HandleSwappedError": 30, "refused:CapacityError": 100,
        "copy-on-write copies": 100, "evictions": 100,
    }
    low = {name: counts[name] for name, floor in floors.items() if counts[name] < floor * scale}
    assert not low, f"the run exercised too little: {low} (all counts: {dict(counts)})"
    missing = [name for name in ops.OPS if not counts[name]]
    assert not missing, f"operations that never ran: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_operations_agree_with_a_dense_reference_bit_for_bit(backend, seed):
    counts = run_differential(backend, seed, OPERATIONS)
    assert counts["operations"] == OPERATIONS
    _assert_it_exercised_everything(counts, OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("key", [constant_key, own_tokens_key], ids=["one-key", "own-tokens-key"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_operations_on_colliding_keys_never_read_another_prefix(backend, key,
                                                                       monkeypatch):
    """Keys forced to collide (every block on one key, or on its own tokens only): a
    collision may cost hits, never data."""
    monkeypatch.setattr(ChainHasher, "keys", lambda self, blocks, parent: key(self, blocks))
    monkeypatch.setattr(ChainHasher, "step", lambda self, parents, blocks: key(self, blocks))
    counts = run_differential(backend, 3, OPERATIONS // 3, exact_hits=False)
    assert counts["prefix-hit"] > 0 and counts["refused:StaleSlotMappingError"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60 if THOROUGH else 6, deadline=None, database=None,
          derandomize=not THOROUGH,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_chosen_operations_agree_with_the_reference(backend, data):
    """The same operations with every choice drawn by hypothesis: a failure shrinks to
    a short sequence of small choices."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="K/V bits seed")
    driver = Driver(backend, HypothesisChoices(data), data_seed=seed)
    try:
        for _ in range(150):
            driver.step()
    finally:
        driver.close()


# --- the test has teeth: planted faults make it fail -------------------------------------


@pytest.fixture
def no_copy_on_write_check_in_write_slots(monkeypatch):
    """write_slots (its check and its once-per-step fast path) no longer asks whether a
    block may be written in place: version and gap checks stay, the copy-on-write
    rule goes (issue 10, defect 1)."""
    real_check, real_prepare = writes.check_mapping, writes.prepare_fast_path
    # The copy-on-write rule: one writable() per layer group (a group's parts).
    rule = getattr(coordinator, "GroupParts", coordinator.Coordinator)

    def check_mapping(*args, **kwargs):
        with mock.patch.object(rule, "writable", allow_every_write):
            return real_check(*args, **kwargs)

    def prepare_fast_path(*args, **kwargs):
        with mock.patch.object(rule, "writable", allow_every_write):
            return real_prepare(*args, **kwargs)

    monkeypatch.setattr(writes, "check_mapping", check_mapping)
    monkeypatch.setattr(writes, "prepare_fast_path", prepare_fast_path)


@pytest.fixture
def weak_prefix_verification(monkeypatch):
    """Prefix hits proven by own tokens under a weak, unchained key (issue 10, defect 2)."""
    monkeypatch.setattr(ChainHasher, "keys", lambda self, blocks, parent: own_tokens_key(
        self, blocks))
    monkeypatch.setattr(ChainHasher, "step", lambda self, parents, blocks: own_tokens_key(
        self, blocks))
    monkeypatch.setattr(PrefixIndex, "lookup", lookup_own_tokens_only)


@pytest.fixture
def salts_ignored(monkeypatch):
    """Every salt gets the same chain root and lookups skip the salt: tenants share."""
    monkeypatch.setattr(ChainHasher, "root", lambda self, salt: 12345)
    real_lookup = PrefixIndex.lookup

    def lookup(self, keys, rows, salt, *, pending=False):
        with mock.patch.object(self, "salt", np.full_like(self.salt, salt)):
            return real_lookup(self, keys, rows, salt, pending=pending)

    monkeypatch.setattr(PrefixIndex, "lookup", lookup)


#: How the reference says a request was handed another prefix's K/V.
SERVED_FOREIGN_KV = ("served K/V that no request with the identical prefix",
                     "the joined prefix differs from what its writer")


def _fails(backend: str, seed: int, operations: int) -> str:
    with pytest.raises(DifferentialFailure) as failure:
        run_differential(backend, seed, operations)
    return str(failure.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_it_fails_when_write_slots_skips_copy_on_write(backend,
                                                       no_copy_on_write_check_in_write_slots):
    message = _fails(backend, seed=4, operations=3000)
    assert "write_slots accepted the mapping" in message, message


def test_it_fails_on_data_alone_when_write_slots_skips_copy_on_write(
        no_copy_on_write_check_in_write_slots, monkeypatch):
    """Without the rule that names which mappings must be refused, the corrupted K/V
    of the request sharing the block is caught by the reads."""
    real_reuse = scenarios.reuse

    def reuse_without_rules(d, rec, layer, must_refuse=False):
        return real_reuse(d, rec, layer)

    monkeypatch.setattr(model.MapRec, "must_be_stale", lambda self: False)
    monkeypatch.setattr(ops, "reuse", reuse_without_rules)
    monkeypatch.setattr(scenarios, "reuse", reuse_without_rules)
    message = _fails("numpy", seed=4, operations=3000)
    assert "differs at position" in message or "differ from what it wrote" in message, message


@pytest.mark.parametrize("backend", BACKENDS)
def test_it_fails_when_prefix_hits_trust_a_weak_own_tokens_key(backend,
                                                               weak_prefix_verification):
    message = _fails(backend, seed=2, operations=3000)
    assert any(why in message for why in SERVED_FOREIGN_KV), message


def test_it_fails_when_salts_no_longer_separate_tenants(salts_ignored):
    message = _fails("numpy", seed=1, operations=5000)
    assert any(why in message for why in SERVED_FOREIGN_KV), message
