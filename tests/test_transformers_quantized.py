"""A KvCoreCache over a quantized manager (int8, float8 E4M3 and E5M2 codes with a
scale per token and head): the rectangle transformers attends over is the codes
decoded exactly as kvcore decodes them, in the model's dtype, never the raw codes."""

from __future__ import annotations

import numpy as np
import pytest
# CI installs both: a missing one must fail here, not skip.
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcore
from kvcore.integrations._batch_reads import PoolViews
from kvcore.integrations.transformers import KvCoreCache, cache_config_for

CODECS = ["int8", "float8_e4m3", "float8_e5m2"]
BACKENDS = ["torch", "numpy"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", CODECS)
def test_pool_reads_decode_codes_exactly_as_the_handle_reads_them(codec, backend):
    cfg = kvcore.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype=codec,
                             compute_dtype="float32", block_size=4, num_blocks=16)
    mgr = kvcore.KvCacheManager(cfg, backend=backend)
    rng = np.random.default_rng(7)
    handles, lengths = [], [9, 6]
    for i, n in enumerate(lengths):
        h = mgr.allocate(kvcore.AllocationRequest(request_id=f"r{i}",
                                                  prompt_token_ids=list(range(i, i + n))))
        for layer in range(2):
            k = rng.standard_normal((n, 2, 16)).astype(np.float32) * 3
            k[0, 0, :3] = [0.0, -0.0, 1e-30]  # a tiny row element and signed zeros
            v = rng.standard_normal((n, 2, 16)).astype(np.float32)
            mgr.write(h, layer, k, v)
        handles.append(h)
    width = max(lengths)
    # Each row's slots, the short row padded with its first slot (as the rectangle is).
    rows = [h.block_table().slots(0, n) for h, n in zip(handles, lengths)]
    index = np.stack([np.concatenate([r, np.full(width - len(r), r[0])]) for r in rows])
    views = PoolViews(mgr)
    for layer in range(2):
        key, value = views.gather(layer, torch.from_numpy(index.reshape(-1)), 2, width)
        assert key.dtype == value.dtype == torch.float32
        assert key.shape == (2, 2, width, 16)  # [batch, heads, columns, dim]
        for row, (h, n) in enumerate(zip(handles, lengths)):
            want_k = np.from_dlpack(h.key_cache(layer))
            want_v = np.from_dlpack(h.value_cache(layer))
            got_k = key[row, :, :n].transpose(0, 1).numpy()
            got_v = value[row, :, :n].transpose(0, 1).numpy()
            assert got_k.view(np.uint32).tolist() == want_k.view(np.uint32).tolist()
            assert got_v.view(np.uint32).tolist() == want_v.view(np.uint32).tolist()


def test_a_quantized_cache_computes_in_the_models_dtype_unless_told():
    model = tiny_llama()
    assert cache_config_for(model, num_blocks=8, dtype="int8").compute_dtype.value == "float32"
    told = cache_config_for(model, num_blocks=8, dtype="int8", compute_dtype="bfloat16")
    assert told.compute_dtype.value == "bfloat16"
    assert cache_config_for(model, num_blocks=8).compute_dtype.value == "float32"


@pytest.mark.parametrize("codec", CODECS)
def test_generate_on_a_quantized_cache_stays_near_the_float_caches_logits(codec):
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]])
    mask = torch.ones_like(ids)
    runs = {}
    for dtype in ("float32", codec):
        with KvCoreCache.from_model(model, backend="torch", num_blocks=32, block_size=4,
                                    dtype=dtype) as cache:
            out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                 max_new_tokens=6, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        runs[dtype] = torch.stack(out.logits)
    exact, quantized = runs["float32"], runs[codec]
    assert quantized.dtype == torch.float32 and torch.isfinite(quantized).all()
    # The prefill attends over the K/V it was handed; the first decode step reads the
    # whole prompt back from the pools, so its logits differ by the codec's error
    # alone (int8 and E4M3 keep about 2 significant digits, E5M2 one and a half).
    assert torch.equal(quantized[0], exact[0])
    tol = {"int8": 0.05, "float8_e4m3": 0.15, "float8_e5m2": 0.3}[codec]
    err = (quantized[1] - exact[1]).abs().max().item()
    assert 0 < err < tol, (codec, err)
