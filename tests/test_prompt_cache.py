"""transformers' "re-use a prompt cache" recipe on KvCoreCache: prefill a system prompt
once, then generate each user turn from ``copy.deepcopy(prompt_cache)``.  Each scenario
runs on DynamicCache and on KvCoreCache in the same test and compares the tokens; the
copies are copy-on-write forks that cost no K/V memory until they write; a cache saves
to a file and loads back into another manager, continuing generation exactly."""

from __future__ import annotations

import copy
import gc
import json
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
# CI installs both: a missing one must fail here, not skip.
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcore
from kvcore.errors import (CacheError, CacheFileError, LayoutMismatchError, ManagerClosedError,
                           NotCopyableError)
from kvcore.integrations._cache_state import REMADE_ON_FORK, SHARED_ON_FORK
from kvcore.integrations.transformers import KvCoreCache, cache_config_for

BS = 4
SYSTEM = [1, 5, 17, 33, 9, 41, 77, 12, 3, 90]  # 10 tokens: its last block is half full
TURNS = [[44, 45, 46], [7, 8], [100, 101, 102, 103, 104, 105]]
NEW = 6


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaForCausalLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)
    yield LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


class TokenCounter:
    """Counts the tokens the model computes: a forward hook on the embedding layer."""

    def __init__(self, model) -> None:
        self.seen = 0
        self._hook = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.seen += int(args[0].numel())

    def take(self) -> int:
        seen, self.seen = self.seen, 0
        return seen

    def close(self) -> None:
        self._hook.remove()


@pytest.fixture
def counter(model) -> Iterator[TokenCounter]:
    c = TokenCounter(model)
    yield c
    c.close()


def _kv(model, backend="torch", *, manager=None, blocks=128) -> KvCoreCache:
    if manager is not None:
        return KvCoreCache(manager)
    return KvCoreCache.from_model(model, backend=backend, num_blocks=blocks, block_size=BS)


def _prefill(model, cache, ids: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache)
    assert out.cache is cache
    return cache


def _generate(model, ids, mask=None, **kwargs) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                          do_sample=False, **kwargs)


def _with_turn(turn: list[int], system=SYSTEM) -> torch.Tensor:
    return torch.tensor([system + turn])


def _bits(cache: KvCoreCache) -> list[list[np.ndarray]]:
    """Every row's K/V of every layer, as raw bits (to prove nothing changed)."""
    out = []
    for h in cache.handles:
        row = []
        for layer in range(cache.manager.config.num_layers):
            k, v = h.kv_cache(layer)
            row += [np.asarray(k.native).view(np.uint32).copy(),
                    np.asarray(v.native).view(np.uint32).copy()]
        out.append(row)
    return out


def _same_bits(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for ra, rb in zip(a, b)
                                    for x, y in zip(ra, rb))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("spelling", ["past_key_values", "cache"])
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_every_turn_from_a_deepcopy_equals_dynamic_cache_and_skips_the_prompt(
        model, counter, backend, spelling):
    system = torch.tensor([SYSTEM])
    dynamic = _prefill(model, DynamicCache(config=model.config), system)
    paged = _prefill(model, _kv(model, backend), system)
    assert counter.take() == 2 * len(SYSTEM)
    # The prompt's K/V are DynamicCache's, bit for bit.
    for layer, h in enumerate([paged.handles[0]] * 2):
        k, v = h.kv_cache(layer)
        assert torch.equal(torch.from_dlpack(k).transpose(0, 1), dynamic.layers[layer].keys[0])
        assert torch.equal(torch.from_dlpack(v).transpose(0, 1), dynamic.layers[layer].values[0])
    before = _bits(paged)
    for turn in TURNS:
        ids = _with_turn(turn)
        scratch = _generate(model, ids)
        assert counter.take() == len(SYSTEM) + len(turn) + NEW - 1
        outputs = []
        for prompt_cache in (dynamic, paged):
            outputs.append(_generate(model, ids, **{spelling: copy.deepcopy(prompt_cache)}))
            # Only the turn and the new tokens are computed: the prompt comes from the copy.
            assert counter.take() == len(turn) + NEW - 1
        assert torch.equal(outputs[0], scratch)
        assert torch.equal(outputs[1], scratch)
        # The prompt cache is untouched, ready for the next copy.
        assert paged.get_seq_length() == dynamic.get_seq_length() == len(SYSTEM)
        assert _same_bits(_bits(paged), before)
    paged.manager.check_invariants()


def test_a_ragged_batch_of_system_prompts_copies_row_by_row(model, counter):
    systems = [SYSTEM, SYSTEM[:7] + [60, 61, 62, 63, 64], [9, 9, 9]]
    width = max(map(len, systems))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(systems):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    dynamic = _prefill(model, DynamicCache(config=model.config), ids, mask)
    paged = _kv(model)
    paged.set_prompts(ids, mask)  # rows keep their ids: prefix caching, no padding stored
    _prefill(model, paged, ids, mask)
    assert [h.num_tokens() for h in paged.handles] == [len(s) for s in systems]
    counter.take()
    turn = torch.tensor([[44, 45], [46, 47], [48, 49]])
    full, full_mask = torch.cat([ids, turn], 1), torch.cat([mask, torch.ones_like(turn)], 1)
    scratch = _generate(model, full, full_mask)
    counter.take()
    for _ in range(2):
        got = [_generate(model, full, full_mask, cache=copy.deepcopy(c)) for c in (dynamic, paged)]
        assert counter.take() == 2 * 3 * (2 + NEW - 1)
        assert torch.equal(got[0], scratch) and torch.equal(got[1], scratch)


@pytest.mark.parametrize("system,cow", [(SYSTEM, 1), (SYSTEM[:8], 0)],
                         ids=["ends-mid-block", "ends-on-a-block"])
def test_copies_cost_no_memory_until_they_write(model, system, cow):
    paged = _prefill(model, _kv(model), torch.tensor([system]))
    manager = paged.manager
    used = manager.stats().used_blocks
    copies = [copy.deepcopy(paged) for _ in range(8)]
    stats = manager.stats()
    assert stats.used_blocks == used and stats.copy_on_write_copies == 0
    assert len(manager) == 9
    assert all(c.manager is manager and c.get_seq_length() == len(system) for c in copies)
    assert len({h.request_id for c in [paged, *copies] for h in c.handles}) == 9
    # A copy's first new token goes into the shared last block: copied then, only if
    # that block is partly filled; a prompt of whole blocks shares them all for good.
    _generate(model, torch.tensor([system + [44]]), cache=copies[0])
    assert manager.stats().copy_on_write_copies == cow
    _generate(model, torch.tensor([system + [45]]), cache=copies[1])
    assert manager.stats().copy_on_write_copies == 2 * cow
    manager.check_invariants()


def test_copy_fork_and_deepcopy_share_the_manager_and_nothing_else(model):
    paged = _prefill(model, _kv(model, "numpy"), torch.tensor([SYSTEM]))
    for make in (copy.copy, copy.deepcopy, KvCoreCache.fork):
        other = make(paged)
        assert type(other) is KvCoreCache and other.manager is paged.manager
        assert [h.num_tokens() for h in other.handles] == [len(SYSTEM)]
        assert other.handles[0].request_id != paged.handles[0].request_id
        assert other.handles[0].block_table().physical_blocks == \
            paged.handles[0].block_table().physical_blocks
        assert all(layer._owner is other for layer in other.layers)
        assert other.layers[0] is not paged.layers[0] and other.layers[0].is_initialized
        assert other._pads is not paged._pads and other._layer_len is not paged._layer_len
        other.release()  # gives back its own rows only
        assert paged.handles[0].is_valid() and paged.get_seq_length() == len(SYSTEM)
    pair = copy.deepcopy([paged, paged])
    assert pair[0] is pair[1]  # deepcopy's memo: one copy per original
    # An empty cache copies to an empty cache.
    assert copy.deepcopy(KvCoreCache(paged.manager)).handles == []


def test_every_attribute_of_the_cache_has_a_fork_policy(model):
    # A new attribute must be classified in _cache_state (shared or remade on fork).
    paged = _kv(model)
    paged.set_prompts(_with_turn([3]))
    _generate(model, _with_turn([3]), cache=paged)
    assert set(vars(paged)) == SHARED_ON_FORK | REMADE_ON_FORK
    assert not SHARED_ON_FORK & REMADE_ON_FORK


def test_generating_from_one_copy_leaves_the_others_and_the_original_exact(model):
    paged = _prefill(model, _kv(model), torch.tensor([SYSTEM]))
    first, second = copy.deepcopy(paged), copy.deepcopy(paged)
    expect = [_generate(model, _with_turn(t)) for t in TURNS[:2]]
    assert torch.equal(_generate(model, _with_turn(TURNS[0]), cache=first), expect[0])
    assert torch.equal(_generate(model, _with_turn(TURNS[1]), cache=second), expect[1])
    # And the original itself, used last, still holds the untouched prompt.
    assert torch.equal(_generate(model, _with_turn(TURNS[0]), cache=paged), expect[0])


def test_copies_dropped_without_release_give_their_blocks_back(model):
    paged = _prefill(model, _kv(model), torch.tensor([SYSTEM]))
    manager = paged.manager
    used = manager.stats().used_blocks
    for turn in TURNS:  # the recipe as written: nothing is released by hand
        _generate(model, _with_turn(turn), cache=copy.deepcopy(paged))
    gc.collect()
    kept = copy.deepcopy(paged)  # a safe point: collected copies are deallocated here
    assert len(manager) == 2 and manager.stats().used_blocks == used
    del kept
    manager.check_invariants()


def test_copying_mid_forward_pickling_or_after_close_is_refused(model):
    paged = _prefill(model, _kv(model), torch.tensor([SYSTEM]))
    with pytest.raises(NotCopyableError, match=r"fork.*manager\.save"):
        pickle.dumps(paged)
    k = torch.zeros(1, 2, 1, 16)
    paged.update(k, k, 0)  # layer 0 of a new pass; layer 1 not yet
    with pytest.raises(CacheError, match="forward pass is half done"):
        copy.deepcopy(paged)
    paged.update(k, k, 1)
    assert copy.deepcopy(paged).get_seq_length() == len(SYSTEM) + 1
    paged.manager.close()
    with pytest.raises(ManagerClosedError):
        copy.deepcopy(paged)


# --- save and load -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_saved_prompt_cache_loads_into_another_manager_and_serves_the_recipe(
        model, counter, tmp_path, backend):
    paged = _kv(model, backend)
    paged.set_prompts(torch.tensor([SYSTEM]))
    _prefill(model, paged, torch.tensor([SYSTEM]))
    paged.save(tmp_path / "system.safetensors", metadata={"note": "system prompt"})
    info = kvcore.inspect_cache_file(tmp_path / "system.safetensors")
    assert info.metadata["note"] == "system prompt" and "kvcore.transformers" in info.metadata
    # Another manager, another block size: the file stores tokens, not blocks.
    manager = kvcore.KvCacheManager(cache_config_for(model, num_blocks=64, block_size=8),
                                    backend=backend)
    loaded = KvCoreCache.load(tmp_path / "system.safetensors", manager=manager)
    assert loaded.get_seq_length() == len(SYSTEM) and loaded.manager is manager
    assert loaded.handles[0].token_ids() == tuple(SYSTEM)
    assert _same_bits(_bits(loaded), _bits(paged))
    counter.take()
    for turn in TURNS[:2]:
        got = _generate(model, _with_turn(turn), cache=copy.deepcopy(loaded))
        assert counter.take() == len(turn) + NEW - 1
        assert torch.equal(got, _generate(model, _with_turn(turn)))
        counter.take()
    # Its full prompt block re-entered the prefix cache of the new manager.
    later = manager.allocate(kvcore.AllocationRequest(request_id="later",
                                                      prompt_token_ids=SYSTEM + [1]))
    assert later.num_cached_tokens() == 8


def test_a_cache_saved_mid_conversation_continues_exactly(model, tmp_path):
    systems = [SYSTEM, [9, 9, 9, 8]]
    ids = torch.tensor([[0] * 6 + systems[1], SYSTEM])
    mask = (torch.arange(10) >= torch.tensor([[6], [0]])).long()
    dynamic = DynamicCache(config=model.config)
    paged = _kv(model)
    out = [_generate(model, ids, mask, cache=c) for c in (dynamic, paged)]
    assert torch.equal(out[0], out[1])
    paged.save(tmp_path / "chat")
    loaded = KvCoreCache.load(tmp_path / "chat", manager=paged.manager)  # same manager
    assert loaded._pads.tolist() == paged._pads.tolist()
    assert [h.num_tokens() for h in loaded.handles] == [h.num_tokens() for h in paged.handles]
    turn = torch.tensor([[70, 71], [72, 73]])
    ids2 = torch.cat([out[0], turn], 1)
    mask2 = torch.cat([mask, torch.ones(2, NEW + 2, dtype=torch.long)], 1)
    expect = _generate(model, ids2, mask2, cache=dynamic)
    assert torch.equal(_generate(model, ids2, mask2, cache=loaded), expect)
    assert torch.equal(_generate(model, ids2, mask2, cache=paged), expect)


def test_loading_the_wrong_file_or_into_the_wrong_model_changes_nothing(model, tmp_path):
    paged = _prefill(model, _kv(model), torch.tensor([SYSTEM]))
    paged.manager.save(tmp_path / "plain", paged.handles)
    paged.save(tmp_path / "cache")
    manager = kvcore.KvCacheManager(cache_config_for(model, num_blocks=64, block_size=BS),
                                    backend="torch")
    with pytest.raises(CacheFileError, match="not by KvCoreCache.save"):
        KvCoreCache.load(tmp_path / "plain", manager=manager)
    wide = kvcore.KvCacheManager(manager.config.model_copy(update={"head_dim": 32}),
                                 backend="torch")
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        KvCoreCache.load(tmp_path / "cache", manager=wide)
    assert len(manager) == len(wide) == 0
    assert manager.stats().used_blocks == wide.stats().used_blocks == 0


# --- the bench -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bench_prompt_copy_reports_copies_cost_no_bytes_against_dynamic_cache(capsys, backend):
    from kvcore.bench import main

    assert main(["--quick", "--json", "-w", "prompt_copy", "-b", backend, "--copies", "3",
                 "--copy-prompt", "30", "--block-size", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not doc["skipped"], doc["skipped"]
    [result] = doc["results"]
    figures, raw = result["figures"], result["details"]
    per_copy = raw["dynamic_original_bytes"]  # 30 tokens x 2 x 4 layers x 2 heads x 32 x 4 B
    assert per_copy == 30 * 2 * 4 * 2 * 32 * 4
    assert figures["copies_kv_bytes"]["value"] == 0
    assert figures["copies_kv_bytes"]["baseline"] == 3 * per_copy
    # 30 tokens in blocks of 8: 4 blocks; each copy's first token copies the shared
    # partial last block (copy-on-write) and nothing else.
    assert raw["kvcore_original_bytes"] == 4 * raw["bytes_per_block"]
    assert raw["copy_on_write_copies"] == 3
    assert figures["held_kv_bytes_after_one_token"]["value"] == 7 * raw["bytes_per_block"]
    assert raw["identical"] is True
