"""generate() on a kvcore-backed cache gives exactly the tokens of transformers' own
DynamicCache: greedy, beam search and sampling, ragged batches, prefix sharing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
# CI installs both: a missing one must fail here, not skip.
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcore
from kvcore.errors import CapacityError, DtypeMismatchError, ShapeMismatchError
from kvcore.integrations.transformers import KvCoreCache, cache_config_for, track_token_ids

PREFIX = [5, 17, 33, 9, 41, 77, 12, 3, 90, 64, 8, 21]  # three blocks of 4
PROMPTS = [PREFIX + [44, 45], [3, 4, 5], PREFIX + [7, 8, 9, 10, 11, 12, 13], PREFIX]
NEW = 8


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaForCausalLM]:
    # Matrices this small run fastest, and steadiest on a busy CI box, on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)
    yield LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, as a tokenizer with padding_side='left' builds them."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _generate(model, prompts, cache, **kwargs) -> torch.Tensor:
    ids, mask = _batch(prompts)
    if cache is None:
        cache = DynamicCache(config=model.config)
    return model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                          max_new_tokens=NEW, **kwargs)


def _cache(model, backend="torch", *, prompts=None, manager=None) -> KvCoreCache:
    if manager is None:
        cache = KvCoreCache.from_model(model, backend=backend, num_blocks=128, block_size=4)
    else:
        cache = KvCoreCache(manager)
    if prompts is not None:
        cache.set_prompts(*_batch(prompts))
    return cache


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("told", [True, False], ids=["prompts-set", "padding-stored"])
def test_greedy_generation_of_a_ragged_batch_equals_dynamic_cache(model, backend, told):
    expect = _generate(model, PROMPTS, None, do_sample=False)
    cache = _cache(model, backend, prompts=PROMPTS if told else None)
    got = _generate(model, PROMPTS, cache, do_sample=False)
    assert torch.equal(got, expect)
    width = max(map(len, PROMPTS))
    stored = [h.num_tokens() for h in cache.handles]
    # Told the prompts, rows hold their real tokens only; otherwise padding too.
    assert stored == ([len(p) + NEW - 1 for p in PROMPTS] if told
                      else [width + NEW - 1] * len(PROMPTS))
    cache.release()
    assert cache.manager.stats().used_blocks == 0


def test_prompts_sharing_a_prefix_share_blocks_and_give_the_same_tokens(model):
    expect = _generate(model, PROMPTS, None, do_sample=False)
    alone = _cache(model)  # padding stored, nothing shared
    _generate(model, PROMPTS, alone, do_sample=False)
    cache = _cache(model, prompts=PROMPTS)
    got = _generate(model, PROMPTS, cache, do_sample=False)
    assert torch.equal(got, expect)
    stats = cache.manager.stats()
    assert stats.prefix_cache_hits >= 6  # rows 2 and 3 reuse row 0's three blocks
    assert cache.num_cached_tokens[0] == 0 and min(cache.num_cached_tokens[2:]) >= 12
    # Shared while row 0's prefill ran (join_pending): one allocation per row, no
    # re-allocation or copy after the prefill.
    assert stats.allocations == len(PROMPTS) and stats.copy_on_write_copies == 0
    assert stats.used_blocks < alone.manager.stats().used_blocks
    cache.manager.check_invariants()


def test_prompt_blocks_of_one_generate_call_serve_the_next(model):
    manager = kvcore.KvCacheManager(cache_config_for(model, num_blocks=128, block_size=4),
                                    backend="torch")
    with _cache(model, manager=manager, prompts=[PREFIX + [99]]) as first:
        _generate(model, [PREFIX + [99]], first, do_sample=False)
    later = [PREFIX + [50, 51, 52], [7, 7, 7, 7, 7]]
    expect = _generate(model, later, None, do_sample=False)
    cache = _cache(model, manager=manager, prompts=later)
    got = _generate(model, later, cache, do_sample=False)
    assert torch.equal(got, expect)
    assert cache.num_cached_tokens == [12, 0]  # served at allocation, not recomputed
    cache.release()
    manager.check_invariants()


class Fed:
    """The tokens the model computes per forward pass (a hook on the embeddings)."""

    def __init__(self, model) -> None:
        self.passes: list[int] = []
        self._hook = model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: self.passes.append(int(args[0].shape[1])))

    def close(self) -> None:
        self._hook.remove()


def _chat_turns(model, manager, tracked: bool):
    """Two chat turns on one manager; turn 2's prompt repeats turn 1's prompt and
    reply.  Returns (turn 2's skipped columns, the tokens it fed the model first, its
    output, DynamicCache's output)."""
    turn1 = [PREFIX + [99, 98, 97]]
    first = KvCoreCache(manager)
    first.set_prompts(*_batch(turn1))
    if tracked:
        track_token_ids(model)
    out = _generate(model, turn1, first, do_sample=False)
    first.release()
    turn2 = [out[0].tolist() + [60, 61]]
    expect = _generate(model, turn2, None, do_sample=False)
    fed = Fed(model)
    try:
        cache = KvCoreCache(manager)
        cache.set_prompts(*_batch(turn2))
        skipped = cache.get_seq_length()
        got = _generate(model, turn2, cache, do_sample=False)
    finally:
        fed.close()
    cache.release()
    manager.check_invariants()
    return skipped, fed.passes[0], got, expect


def test_a_chat_turn_reuses_the_earlier_turn_reply_included(model):
    # from_model tracks the model's input ids, so the decode steps extend the rows with
    # their tokens: turn 1's reply blocks join the prefix cache like its prompt blocks.
    manager = KvCoreCache.from_model(model, num_blocks=128, block_size=4).manager
    skipped, fed, got, expect = _chat_turns(model, manager, tracked=True)
    assert torch.equal(got, expect)
    prompt2 = len(PREFIX) + 3 + NEW + 2
    # Held: every full block before the reply's last token (never fed to the model).
    assert skipped == (len(PREFIX) + 3 + NEW - 1) // 4 * 4 and skipped > len(PREFIX) + 3
    assert fed == prompt2 - skipped


def test_an_untracked_model_reuses_the_prompt_blocks_only(model):
    # A cache built on a manager for a model nobody tracked sees no ids after the
    # prompt: the chain stops there, and turn 2 recomputes turn 1's reply.
    config = cache_config_for(model, num_blocks=128, block_size=4)
    fresh = LlamaForCausalLM(model.config).eval()  # same shapes, never tracked
    fresh.load_state_dict(model.state_dict())
    skipped, fed, got, expect = _chat_turns(fresh, kvcore.KvCacheManager(config, "torch"),
                                            tracked=False)
    assert torch.equal(got, expect)
    assert skipped == (len(PREFIX) + 3) // 4 * 4


def test_ids_of_a_failed_pass_never_reach_the_next_one(model):
    cache = KvCoreCache.from_model(model, num_blocks=64, block_size=4)
    cache.set_prompts(*_batch([PREFIX]))
    _generate(model, [PREFIX], cache, do_sample=False)
    known = cache.handles[0].token_ids()
    assert known is not None and len(known) == len(PREFIX) + NEW - 1  # decode ids kept
    with pytest.raises(IndexError):  # fails in the embedding, before any cache update
        model(input_ids=torch.tensor([[1000]]), cache=cache)
    # The next pass comes through the inner model, which nobody tracks: it has no ids,
    # and must not be given the failed pass's.
    with torch.no_grad():
        model.model(input_ids=torch.tensor([[7]]), cache=cache)
    assert cache.handles[0].token_ids() is None  # the chain ends; no 1000 in it
    cache.release()


@pytest.mark.parametrize("told", [True, False], ids=["prompts-set", "padding-stored"])
def test_beam_search_forks_beams_and_equals_dynamic_cache(model, told):
    kwargs = dict(do_sample=False, num_beams=3, num_return_sequences=2)
    expect = _generate(model, PROMPTS[:3], None, **kwargs)
    cache = _cache(model, prompts=PROMPTS[:3] if told else None)
    got = _generate(model, PROMPTS[:3], cache, **kwargs)
    assert torch.equal(got, expect)
    stats = cache.manager.stats()
    assert stats.copy_on_write_copies > 0  # beams forked, then wrote their shared block
    assert len(cache.handles) == 9
    cache.manager.check_invariants()
    cache.release()
    assert cache.manager.stats().used_blocks == 0


def test_sampling_several_sequences_per_prompt_equals_dynamic_cache(model):
    kwargs = dict(do_sample=True, num_return_sequences=3, top_k=0, temperature=1.0)
    torch.manual_seed(7)
    expect = _generate(model, PROMPTS, None, **kwargs)
    cache = _cache(model, prompts=PROMPTS)
    torch.manual_seed(7)
    got = _generate(model, PROMPTS, cache, **kwargs)
    assert torch.equal(got, expect)
    assert len(set(map(tuple, got[:3, -NEW:].tolist()))) > 1  # the samples differ
    cache.release()


def test_rows_that_finish_early_keep_matching(model):
    ref = _generate(model, PROMPTS, None, do_sample=False)
    eos = int(ref[0, -NEW + 2])  # a token row 0 emits at its third step
    expect = _generate(model, PROMPTS, None, do_sample=False, eos_token_id=eos)
    got = _generate(model, PROMPTS, _cache(model, prompts=PROMPTS), do_sample=False,
                    eos_token_id=eos)
    assert torch.equal(got, expect)


def test_misuse_is_refused_with_typed_errors(model):
    cache = _cache(model)
    ids, mask = _batch(PROMPTS)
    with pytest.raises(ValueError, match="expected left padding"):
        cache.set_prompts(ids, mask.flip(1))
    cache.set_prompts(ids[:3], mask[:3])  # allocates the three rows now
    held = cache.manager.stats().used_blocks
    with pytest.raises(ShapeMismatchError, match="set_prompts got 3 prompts"):
        model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=2,
                       do_sample=False)
    assert cache.manager.stats().used_blocks == held  # nothing more, nothing half-done
    cache.release()
    assert cache.manager.stats().used_blocks == 0
    with pytest.raises(ValueError, match="pass a negative number"):
        cache.crop(3)
    half = KvCoreCache.from_model(model, num_blocks=64, dtype="float16")
    with pytest.raises(DtypeMismatchError, match="float16"):
        _generate(model, PROMPTS, half, do_sample=False)


def test_assisted_decoding_rolls_back_with_crop_and_equals_dynamic_cache(model):
    # A draft model proposes tokens; the ones the main model rejects are cropped from
    # the main model's cache (KvCacheManager.truncate) before the next step.
    torch.manual_seed(1)
    draft = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=None)).eval()
    prompt = [PROMPTS[2]]
    expect = _generate(model, prompt, None, do_sample=False, assistant_model=draft)
    cache = _cache(model)  # the first pass holds prompt + draft: no set_prompts here
    truncated = []
    real_truncate = cache.manager.truncate
    cache.manager.truncate = lambda h, n: (truncated.append(n), real_truncate(h, n))
    got = _generate(model, prompt, cache, do_sample=False, assistant_model=draft)
    assert truncated, "the draft model's tokens were never rejected: crop went untested"
    assert torch.equal(got, expect)
    assert torch.equal(got, _generate(model, prompt, None, do_sample=False))
    cache.manager.check_invariants()
    cache.release()


def test_crop_shortens_every_row_and_refuses_more_than_a_row_holds(model):
    cache = _cache(model, prompts=PROMPTS)
    _generate(model, PROMPTS, cache, do_sample=False)
    lengths = [h.num_tokens() for h in cache.handles]
    before = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == before - 2
    assert [h.num_tokens() for h in cache.handles] == [n - 2 for n in lengths]
    with pytest.raises(CapacityError, match="holds only"):
        cache.crop(-1000)
    assert [h.num_tokens() for h in cache.handles] == [n - 2 for n in lengths]
    cache.manager.check_invariants()
    cache.release()


def test_importing_the_integrations_package_imports_neither_torch_nor_transformers():
    code = ("import sys, kvcore.integrations\n"
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_generation_benchmark_reports_both_caches_from_one_run():
    from kvcore.integrations._generation_bench import benchmark_generation

    r = benchmark_generation(batch_size=2, prompt_len=12, new_tokens=4, repeats=2, warmup=0,
                             shared_prefix=8, block_size=4,
                             model_kwargs=dict(num_layers=2, hidden_size=32, vocab_size=64))
    assert r["identical"] is True
    assert r["kvcore_tokens_per_s"] > 0 and r["dynamic_tokens_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["kvcore_tokens_per_s"] / r["dynamic_tokens_per_s"])
    assert r["prompt_lengths"] == [12, 9] and r["cache_stats"]["prefix_cache_hits"] >= 2
    assert {"backend", "repeats", "threads", "model", "transformers_version"} <= set(r)
    with pytest.raises(ValueError, match="repeats=0"):
        benchmark_generation(repeats=0)


def test_chat_benchmark_reuses_earlier_turns_and_reports_time_to_first_token():
    from kvcore.integrations._chat_bench import benchmark_chat

    r = benchmark_chat(history=40, turns=3, user_tokens=5, reply_tokens=6, block_size=4,
                       repeats=1, model_kwargs=dict(num_layers=2, hidden_size=32,
                                                    vocab_size=64))
    assert r["identical"] is True
    first, *later = r["turns"]
    assert first["reused_tokens"] == 0 and first["prompt_tokens"] == 45
    for turn in later:  # everything up to the last reply's last token, in whole blocks
        assert turn["reused_tokens"] == (turn["prompt_tokens"] - 5 - 1) // 4 * 4
        assert turn["kvcore_ttft_s"] > 0 and turn["dynamic_ttft_s"] > 0
        assert turn["speedup"] == pytest.approx(turn["dynamic_ttft_s"] / turn["kvcore_ttft_s"])
    with pytest.raises(ValueError, match="repeats=0"):
        benchmark_chat(repeats=0)


def test_memory_benchmark_measures_both_caches_peaks():
    from kvcore.integrations._memory_bench import benchmark_kv_memory

    r = benchmark_kv_memory(prefix=32, batch=4, suffix=6, beams=3, beam_prompt=32,
                            new_tokens=6, window=8, block_size=4,
                            model_kwargs=dict(num_layers=2, hidden_size=32, vocab_size=64))
    for name in ("beam_search", "shared_prefix", "sliding_window"):
        assert r[name]["identical"] is True
        assert r[name]["kvcore_peak_bytes"] > 0 and r[name]["dynamic_peak_bytes"] > 0
    # Beams share the prompt's blocks, prompts their common prefix.
    assert r["beam_search"]["ratio"] < 0.6 and r["shared_prefix"]["ratio"] < 0.6


def test_generation_demo_prints_tokens_per_second_and_stats(monkeypatch, capsys):
    from kvcore.integrations import _demo_generate, _generation_bench

    full = _generation_bench.benchmark_generation

    def small(**kwargs):  # the demo's own sizes take seconds; the wiring is the point here
        kwargs.update(new_tokens=3, repeats=1, warmup=0, prompt_len=10,
                      model_kwargs=dict(num_layers=2, hidden_size=32, vocab_size=64))
        return full(**kwargs)

    monkeypatch.setattr(_generation_bench, "benchmark_generation", small)
    assert _demo_generate.run_generation_demo("torch") == 0
    out = capsys.readouterr().out
    assert "tokens/s  kvcore" in out and "prefix hits" in out and "all checks passed" in out
    assert _demo_generate.run_generation_demo("no-such-backend") == 2
