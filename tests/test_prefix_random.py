"""Random engines against the prefix cache: requests built from a few shared blocks
admitted, joined, written in chunks, decoded, freed, with resets and gc in between.
Whatever the interleaving, every read is what the tokens imply and the invariants
hold (:mod:`tests._prefix_world` checks both after every step), also when every
key collides with every other at the same position; and afterwards nothing the
history left behind keeps a prompt computed then from being served."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvcore import AllocationRequest
from kvcore._chain_hash import ChainHasher

from ._prefix_world import World

WORDS = 4  # distinct block contents: prompts share prefixes and duplicate each other


def _prompt(rng: random.Random, w: World) -> list[int]:
    blocks = [rng.randrange(WORDS) for _ in range(rng.randint(0, 4))]
    return w.tokens_of(*blocks) + [rng.randrange(50, 53) for _ in range(rng.randint(0, 3))]


def _run(seed: int, steps: int, *, reuse: bool = True) -> tuple[int, int]:
    rng = random.Random(seed)
    w = World(num_blocks=48, block_size=4)
    ids = 0
    served = joined = 0
    history: list[tuple[list[int], str | None]] = []
    for _ in range(steps):
        live = list(w.tokens)
        op = rng.random()
        if op < 0.3 or not live:
            tokens = _prompt(rng, w)
            join = rng.random() < 0.4
            salt = rng.choice([None, None, "t"])
            request = AllocationRequest(request_id=f"r{ids}", prompt_token_ids=tokens,
                                        extra_key=salt, join_pending=join)
            if w.mgr.can_allocate(request):
                w.allocate(f"r{ids}", tokens, extra_key=salt, join_pending=join)
                history.append((tokens, salt))
                served += w.served(f"r{ids}")
                joined += join and w.served(f"r{ids}") > 0
            ids += 1
        elif op < 0.6:
            rid = rng.choice(live)
            total = len(w.tokens[rid])
            w.write(rid, upto=rng.randint(min(total, 1), total))
        elif op < 0.75:
            rid = rng.choice(live)
            handle = w.mgr.get_handle(rid)
            written = all(handle.num_written(layer) == handle.num_tokens()
                          for layer in range(w.config.num_layers))
            if written and w.mgr.can_allocate(AllocationRequest(request_id="probe",
                                                                num_tokens=4)):
                w.decode(rid, rng.randrange(WORDS))
        elif op < 0.97:
            w.free(rng.choice(live))
        elif op < 0.985:
            w.mgr.reset_prefix_cache()
            w.step()
        else:
            w.mgr.gc()
            w.step()
    # Whatever the history left cached, nothing shadows a prompt computed now: once
    # written, a repeat of it is served every block the last-token rule allows (the
    # latest prompts, whose leftovers are the likeliest to be still cached).
    for rid in list(w.tokens):
        w.free(rid)
    for i, (tokens, salt) in enumerate(history[-8:] if reuse else []):
        w.allocate(f"p{i}", tokens, extra_key=salt)
        w.write(f"p{i}")
        w.allocate(f"q{i}", tokens, extra_key=salt)
        assert w.served(f"q{i}") == max(0, (len(tokens) - 1) // 4) * 4, tokens
        w.free(f"q{i}")
        w.free(f"p{i}")
    return served, joined


# Seed 18 once left a joiner's block registered after the prefill it joined was
# dropped: unreachable, it kept the same prompt computed later from being served.
@pytest.mark.parametrize("seed", [0, 1, 2, 18])
def test_random_engines_read_right_data_and_leave_nothing_shadowing(seed):
    served, joined = _run(seed, 250)
    assert served > 0 and joined > 0  # the run did share, by hits and by joins


@pytest.mark.parametrize("seed", range(2))
def test_random_engines_never_read_wrong_data_when_every_key_collides(seed, monkeypatch):
    # Keys that depend on the position and the salt only: every block at a position
    # collides with every other, so only the recorded chain tells them apart.
    monkeypatch.setattr(ChainHasher, "keys", lambda self, blocks, parent: (
        np.uint64(parent) + np.arange(1, blocks.shape[0] + 1, dtype=np.uint64)))
    monkeypatch.setattr(ChainHasher, "step", lambda self, parents, blocks: (
        parents.astype(np.uint64) + np.uint64(1)))
    served, _ = _run(seed, 250, reuse=False)  # collisions cost misses: no reuse promise
    assert served > 0
