"""Model families with layer groups: generate() on a KvCoreCache built by from_model gives
exactly the tokens of transformers' own cache (DynamicCache, or EncoderDecoderCache for
T5 and BART), while sliding-window layers hold only their window.

Every model is a tiny random-weight one built from a config (nothing is downloaded),
with windows of 8 tokens and blocks of 4, and generations several windows long so the
bound matters: left-padded ragged batches, greedy and beam search."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
# CI installs both: a missing one must fail here, not skip.
import torch
import transformers as tf
from transformers import DynamicCache

from kvcore.errors import ShapeMismatchError, UnsupportedError
from kvcore.integrations.transformers import (KvCoreCache, KvCoreEncoderDecoderCache,
                                              cache_config_for)
from kvcore.models import GroupKind

BS = 4
WINDOW = 8
NEW = 24  # three windows past the prompt
PROMPTS = [[5, 17, 33, 9, 41, 77, 12, 3, 90, 64, 8, 21, 44, 45], [3, 4, 5],
           [5, 17, 33, 9, 41, 77, 12, 3, 90, 64, 8, 21, 7, 8, 9, 10, 11]]
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=None)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]

#: name -> (config, model class): decoder-only models with sliding-window layers.
SLIDING: dict[str, Callable[[], tuple[object, type]]] = {
    # Every layer slides (no layer_types: transformers infers them from sliding_window).
    "mistral": lambda: (tf.MistralConfig(sliding_window=WINDOW, **COMMON),
                        tf.MistralForCausalLM),
    # Layers from max_window_layers on slide, the first one attends in full.
    "qwen2": lambda: (tf.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW,
                                     max_window_layers=1, **COMMON), tf.Qwen2ForCausalLM),
    # Alternating sliding and full layers (Gemma2's default pattern), soft-capped logits.
    "gemma2": lambda: (tf.Gemma2Config(sliding_window=WINDOW, head_dim=16, **COMMON),
                       tf.Gemma2ForCausalLM),
    "gemma3": lambda: (tf.Gemma3TextConfig(sliding_window=WINDOW, head_dim=16,
                                           layer_types=MIXED, **COMMON),
                       tf.Gemma3ForCausalLM),
    # Chunked attention: the cache keeps a window of the chunk size, the mask chunks.
    "llama4": lambda: (tf.Llama4TextConfig(attention_chunk_size=WINDOW, layer_types=[
        "chunked_attention", "full_attention", "chunked_attention"],
        intermediate_size_mlp=128, num_local_experts=2, **COMMON), tf.Llama4ForCausalLM),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Matrices this small run fastest, and steadiest on a busy CI box, on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        config, cls = SLIDING[name]()
        torch.manual_seed(0)
        _MODELS[name] = cls(config).eval()
    return _MODELS[name]


def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, as a tokenizer with padding_side='left' builds them."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def generate(model, cache, prompts=PROMPTS, **kwargs) -> torch.Tensor:
    ids, mask = batch(prompts)
    if cache is None:
        cache = DynamicCache(config=model.config)
    kwargs.setdefault("max_new_tokens", NEW)
    return model.generate(input_ids=ids, attention_mask=mask, cache=cache, do_sample=False,
                          min_new_tokens=kwargs["max_new_tokens"], **kwargs)


class HeldBlocks:
    """The most blocks any row holds in each layer group, checked after every
    extend_batch of the manager (every decode step)."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.most = {g.index: 0 for g in manager.config.groups}
        real = manager.extend_batch

        def extend_batch(handles, *args, **kwargs):
            mapping = real(handles, *args, **kwargs)
            self.look(handles)
            return mapping

        manager.extend_batch = extend_batch

    def look(self, handles) -> None:
        for g in self.manager.config.groups:
            table = self.manager.vllm_block_table(handles, group=g.index, pad_value=-1)
            held = int((table.block_tables >= 0).sum(axis=1).max(initial=0))
            self.most[g.index] = max(self.most[g.index], held)


# --- which layers slide -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_layers_slide_exactly_where_dynamic_cache_slides_them(name):
    model = model_of(name)
    reference = DynamicCache(config=model.config)
    config = cache_config_for(model, num_blocks=16, block_size=BS)
    window = {layer: g.window for g in config.groups for layer in g.layers}
    assert [window[i] for i in range(config.num_layers)] == \
        [getattr(layer, "sliding_window", None) for layer in reference.layers]
    cache = KvCoreCache.from_model(model, num_blocks=16, block_size=BS)
    assert cache.is_sliding == reference.is_sliding and any(cache.is_sliding)
    assert {g.kind for g in config.groups} <= {GroupKind.full, GroupKind.sliding}


def test_sliding_layers_return_dynamic_cache_kv_and_mask_sizes_at_every_step():
    # The same updates on both caches: prefill, a chunk, then single tokens well past
    # the window.  A sliding layer must report the same kv_length / kv_offset and hand
    # back the same K/V (the window's last window - 1 tokens plus the new ones).
    model = model_of("qwen2")  # layer 0 full, layers 1 and 2 sliding
    ref = DynamicCache(config=model.config)
    cache = KvCoreCache.from_model(model, num_blocks=64, block_size=BS)
    gen = torch.Generator().manual_seed(3)
    for n in [5, 3] + [1] * 20:
        for layer in range(3):
            k = torch.randn(2, 2, n, 16, generator=gen)
            v = torch.randn(2, 2, n, 16, generator=gen)
            assert cache.get_mask_sizes(n, layer) == ref.get_mask_sizes(n, layer)
            got, want = cache.update(k, v, layer), ref.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert cache.get_seq_length() == ref.get_seq_length()
    assert cache.get_max_length(1) == ref.get_max_length(1) == WINDOW
    cache.manager.check_invariants()


# --- tokens and memory ------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
@pytest.mark.parametrize("told", [True, False], ids=["prompts-set", "padding-stored"])
@pytest.mark.parametrize("name", sorted(SLIDING))
def test_sliding_window_models_give_dynamic_cache_tokens_holding_only_the_window(
        name, told, beams):
    model = model_of(name)
    expect = generate(model, None, num_beams=beams)
    cache = KvCoreCache.from_model(model, num_blocks=256, block_size=BS)
    held = HeldBlocks(cache.manager)
    if told:
        cache.set_prompts(*batch(PROMPTS))
    got = generate(model, cache, num_beams=beams)
    assert torch.equal(got, expect)
    # A sliding group never holds more than its window plus the block being filled;
    # a full group holds every token.
    groups = cache.manager.config.groups
    longest = max(map(len, PROMPTS)) + NEW - 1
    bound = math.ceil(WINDOW / BS) + 1
    for g in groups:
        if g.kind is GroupKind.sliding:
            assert held.most[g.index] == bound
        else:
            assert held.most[g.index] == math.ceil(longest / BS)
    stats = cache.manager.stats()
    assert stats.window_released_blocks > 0
    cache.manager.check_invariants()
    cache.release()
    assert cache.manager.stats().used_blocks == 0


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_each_steps_read_index_is_the_block_tables_own(name, beams, monkeypatch):
    # A decode step advances the last step's index by one column instead of reading
    # the block tables again; beams reorder it with their rows, and copy-on-write
    # moves a forked row's last block.  Every column a row holds must still name the
    # slot the block table gives it.
    model = model_of(name)
    checked = []
    real = KvCoreCache._rectangle

    def rectangle(self, group, window, n):
        index, width = real(self, group, window, n)
        if self._repeat == 1:
            want = self._rebuilt(group, self._length - width)
            got = index.numpy().reshape(want.shape)
            columns = np.arange(self._length - width, self._length)
            held = columns[None, :] >= self._pads[:, None]
            assert np.array_equal(got[held], want[held])
            checked.append(window)
        return index, width

    monkeypatch.setattr(KvCoreCache, "_rectangle", rectangle)
    cache = KvCoreCache.from_model(model, num_blocks=256, block_size=BS)
    cache.set_prompts(*batch(PROMPTS))
    assert torch.equal(generate(model, cache, num_beams=beams),
                       generate(model, None, num_beams=beams))
    assert checked.count(None) >= NEW - 1 and checked.count(WINDOW) >= NEW - 1


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_a_prompt_prefix_the_manager_holds_is_not_computed_again(name):
    model = model_of(name)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(int(args[0].shape[1])))
    try:
        first = KvCoreCache.from_model(model, num_blocks=256, block_size=BS)
        with first:
            first.set_prompts(*batch(PROMPTS))
            generate(model, first, max_new_tokens=2)
        # The same prompts plus a turn each: every row's prompt blocks are in the pool.
        later = [p + [70 + i, 71, 72] for i, p in enumerate(PROMPTS)]
        expect = generate(model, None, later, max_new_tokens=6)
        seen.clear()
        cache = KvCoreCache(first.manager)
        cache.set_prompts(*batch(later))
        width = max(map(len, later))
        skipped = cache.get_seq_length()
        # The shortest padded row bounds the batch: 3 padding + its 1 cached block.
        assert skipped == min(width - len(p) + (len(p) - 3) // BS * BS
                              for p in later) > 0
        got = generate(model, cache, later, max_new_tokens=6)
        assert torch.equal(got, expect)
        assert seen[0] == width - skipped  # the first pass computed only the rest
    finally:
        hook.remove()


FULL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=None)


@pytest.mark.parametrize("make, heads", [
    (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **FULL)),
     2),
    (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **FULL)),
     1),
    (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=None)), 4),
    (lambda: tf.PhiForCausalLM(tf.PhiConfig(num_key_value_heads=4, **FULL)), 4),
    (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**FULL)), 4),
], ids=["qwen3", "gemma", "gpt2", "phi", "gpt-neox"])
@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beams"])
def test_full_attention_families_give_dynamic_cache_tokens(make, heads, beams):
    torch.manual_seed(0)
    model = make().eval()
    expect = generate(model, None, num_beams=beams, max_new_tokens=10)
    cache = KvCoreCache.from_model(model, num_blocks=128, block_size=BS)
    assert cache.manager.config.layer_groups == ()  # one full group: the plain config
    assert cache.manager.config.num_kv_heads == heads
    cache.set_prompts(*batch(PROMPTS))
    assert torch.equal(generate(model, cache, num_beams=beams, max_new_tokens=10), expect)


# --- multi-query, latent attention and explicit shapes ------------------------------------


def _falcon(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, **fields)).eval()


@pytest.mark.parametrize("fields, heads", [
    (dict(multi_query=True), 1),
    # The new architecture broadcasts its 2 KV heads to all 4 before the cache.
    (dict(new_decoder_architecture=True, num_kv_heads=2, multi_query=False), 4),
    (dict(multi_query=False), 4),
], ids=["multi-query", "new-architecture", "multi-head"])
@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beams"])
def test_falcon_layouts_store_the_heads_the_model_hands_the_cache(fields, heads, beams):
    model = _falcon(**fields)
    expect = generate(model, None, num_beams=beams, max_new_tokens=10)
    cache = KvCoreCache.from_model(model, num_blocks=128, block_size=BS)
    assert cache.manager.config.num_kv_heads == heads
    cache.set_prompts(*batch(PROMPTS))
    assert torch.equal(generate(model, cache, num_beams=beams, max_new_tokens=10), expect)


def test_explicit_shapes_override_the_config_instead_of_clashing():
    model = _falcon(multi_query=True)
    # Before: TypeError (num_kv_heads given twice).  Now the override is what is stored.
    cache = KvCoreCache.from_model(model, num_kv_heads=1, num_blocks=64, block_size=BS)
    assert cache.manager.config.num_kv_heads == 1
    assert torch.equal(generate(model, cache, max_new_tokens=4),
                       generate(model, None, max_new_tokens=4))
    wrong = KvCoreCache.from_model(model, num_kv_heads=2, num_blocks=64, block_size=BS)
    with pytest.raises(ShapeMismatchError, match=r"expected \[batch, 2, new_tokens, 16\].*"
                                                 r"num_kv_heads="):
        generate(model, wrong, max_new_tokens=2)
    assert wrong.manager.stats().used_blocks == 0


def test_deepseek_v3_caches_its_compressed_latents_in_a_group_of_two_widths():
    torch.manual_seed(0)
    model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=None)).eval()
    for beams in (1, 2):
        expect = generate(model, None, num_beams=beams, max_new_tokens=8)
        cache = KvCoreCache.from_model(model, num_blocks=128, block_size=BS)
        [group] = cache.manager.config.groups
        assert (group.num_kv_heads, group.k_dim, group.v_dim) == (1, 16, 8)
        assert torch.equal(generate(model, cache, num_beams=beams, max_new_tokens=8), expect)
    # 24 numbers per token and layer, where expanded K/V would be 4 heads x (16 + 8).
    assert cache.manager.config.bytes_per_token == 2 * 24 * 4


# --- encoder-decoder --------------------------------------------------------------------


def _t5() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)).eval()


def _bart() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_encoder_decoder_models_give_encoder_decoder_cache_tokens(make, beams):
    model = make()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # encoders pad on the right
    mask[2, 5:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                  do_sample=False, num_beams=beams)
    expect = model.generate(**kwargs)  # transformers' EncoderDecoderCache of DynamicCaches
    cache = KvCoreCache.from_model(model, num_blocks=128, block_size=BS)
    assert isinstance(cache, KvCoreEncoderDecoderCache)
    kinds = [g.kind for g in cache.manager.config.groups]
    assert kinds == [GroupKind.full, GroupKind.cross]
    got = model.generate(cache=cache, **kwargs)
    assert torch.equal(got, expect)
    # Every row holds the encoder's 11 tokens once; beams of one input share them.
    cross = cache.manager.config.groups[1].index
    table = cache.manager.vllm_block_table(cache.handles, group=cross, pad_value=-1)
    assert len(cache.handles) == 3 * beams
    assert len(set(table.block_tables.reshape(-1).tolist())) == 3 * math.ceil(11 / BS)
    assert cache.cross_attention_cache.get_seq_length(0) == 11
    cache.manager.check_invariants()
    cache.release()
    assert cache.manager.stats().used_blocks == 0 and not any(cache.is_updated.values())


def test_an_encoder_decoder_cache_forks_both_parts_together():
    model = _t5()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = KvCoreCache.from_model(model, num_blocks=64, block_size=BS)
    out = model.generate(input_ids=ids, cache=cache, max_new_tokens=3, do_sample=False)
    copy = cache.fork()
    assert copy.manager is cache.manager and copy.is_updated == cache.is_updated
    assert copy.handles[0].request_id != cache.handles[0].request_id
    assert torch.equal(copy.cross_attention_cache.layers[1].keys,
                       cache.cross_attention_cache.layers[1].keys)
    copy.release()
    assert cache.handles[0].is_valid() and out.shape == (1, 4)


def test_the_numpy_backend_holds_sliding_and_cross_groups_too():
    # Pools torch reads through DLPack: windows and encoder parts work the same.
    model = model_of("gemma2")
    cache = KvCoreCache.from_model(model, backend="numpy", num_blocks=128, block_size=BS)
    cache.set_prompts(*batch(PROMPTS))
    assert torch.equal(generate(model, cache, num_beams=2), generate(model, None, num_beams=2))
    t5 = _t5()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    kwargs = dict(input_ids=ids, max_new_tokens=8, do_sample=False, num_beams=2)
    paged = KvCoreCache.from_model(t5, backend="numpy", num_blocks=64, block_size=BS)
    assert torch.equal(t5.generate(cache=paged, **kwargs), t5.generate(**kwargs))


def test_a_bare_kvcore_cache_on_an_encoder_decoder_model_is_refused_by_name():
    # T5 would call it for self- and cross-attention alike; the pair is what it needs.
    model = _t5()
    bare = KvCoreCache(KvCoreCache.from_model(model, num_blocks=64, block_size=BS).manager)
    with pytest.raises(UnsupportedError, match="use KvCoreEncoderDecoderCache"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), cache=bare, max_new_tokens=2)
    assert bare.manager.stats().used_blocks == 0
    paired = KvCoreEncoderDecoderCache(bare)  # the same cache, paired: it works
    assert torch.equal(
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), cache=paired, max_new_tokens=2),
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2))


# --- what kvcore cannot hold --------------------------------------------------------------


@pytest.mark.parametrize("config, model_type", [
    (lambda: tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2), "mamba"),
    (lambda: tf.JambaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, attn_layer_period=2,
                            attn_layer_offset=1), "jamba"),
    (lambda: tf.Zamba2Config(), "zamba2"),
    (lambda: tf.RwkvConfig(num_hidden_layers=2, hidden_size=32), "rwkv"),
    (lambda: tf.DeepseekV2Config(num_hidden_layers=2), "deepseek_v2"),
], ids=["mamba", "jamba", "zamba2", "rwkv", "mla-unknown"])
def test_models_kvcore_cannot_hold_are_refused_early_by_name(config, model_type):
    with pytest.raises(UnsupportedError, match=rf"^{model_type}: "):
        cache_config_for(config(), num_blocks=8)


def test_a_mamba_model_is_refused_before_any_manager_exists():
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32,
                                               num_hidden_layers=2)).eval()
    with pytest.raises(UnsupportedError, match="mamba: layers 0, 1 are.*state-space"):
        KvCoreCache.from_model(model, num_blocks=8)
