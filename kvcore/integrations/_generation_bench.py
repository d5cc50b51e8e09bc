"""The generation loop as a benchmark: tokens/s of ``generate()`` on kvcore vs DynamicCache.

Both caches run in the same process, on the same randomly initialised Llama-shaped
model (built from a config: nothing is downloaded), on the same prompts, interleaved
repeat by repeat so drift in machine load hits both alike.  Imports torch and
transformers when called, never at import.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["benchmark_generation", "tiny_llama", "ragged_prompts"]


def tiny_llama(*, num_layers: int = 4, hidden_size: int = 128, num_heads: int = 4,
               num_kv_heads: int = 2, vocab_size: int = 512, seed: int = 0) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` in eval mode (float32, cpu)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def ragged_prompts(batch_size: int, prompt_len: int, vocab_size: int, *,
                   shared_prefix: int = 0, seed: int = 0) -> tuple[Any, Any]:
    """Left-padded ``(input_ids, attention_mask)``: prompt ``i`` has
    ``prompt_len - 3 * i`` tokens (at least 1), the first ``shared_prefix`` of them
    common to all prompts."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    common = torch.randint(2, vocab_size, (shared_prefix,), generator=gen)
    ids = torch.zeros(batch_size, prompt_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(batch_size):
        n = max(1, prompt_len - 3 * i)
        own = torch.randint(2, vocab_size, (n,), generator=gen)
        k = min(shared_prefix, n)
        own[:k] = common[:k]
        ids[i, prompt_len - n:] = own
        mask[i, prompt_len - n:] = 1
    return ids, mask


def benchmark_generation(*, backend: str = "torch", batch_size: int = 4,
                         prompt_len: int = 48, new_tokens: int = 32, repeats: int = 5,
                         warmup: int = 1, shared_prefix: int = 32, block_size: int = 16,
                         threads: int | None = 1, num_beams: int = 1,
                         model_kwargs: dict[str, Any] | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy ``generate()`` with :class:`KvCoreCache` and with ``DynamicCache``.

    A ragged, left-padded batch (:func:`ragged_prompts`) whose prompts share their
    first ``shared_prefix`` tokens runs ``warmup`` untimed rounds, then ``repeats``
    timed rounds, each timing DynamicCache then kvcore.  ``threads`` sets torch's
    intra-op threads for the run (``None`` leaves it; restored afterwards).  The kvcore
    manager is reused across rounds with its prefix cache emptied (``gc``) before each,
    so every round starts cold.  ``progress``, when given, is called with one line per
    round (``kvcore bench`` shows them on stderr).

    Returns a JSON-serialisable dict:

    * ``kvcore_tokens_per_s``, ``dynamic_tokens_per_s``: new tokens returned per
      second (``batch_size * new_tokens`` per call, whatever ``num_beams``), from the
      median ``generate`` time over the repeats;
    * ``kvcore_s``, ``dynamic_s``: the median seconds of one ``generate`` call;
    * ``ratio``: ``kvcore_tokens_per_s / dynamic_tokens_per_s`` (1.0 = parity);
    * ``identical``: whether kvcore's tokens equaled DynamicCache's in every round;
    * ``cache_stats``: the manager's :class:`~kvcore.CacheManagerStats` (as a dict)
      at the end of the last round, before its sequences were released;
    * ``backend``, ``batch_size``, ``prompt_lengths``, ``new_tokens``, ``num_beams``,
      ``repeats``, ``warmup``, ``block_size``, ``shared_prefix``, ``threads``,
      ``model`` (layer/head/size numbers), ``torch_version``,
      ``transformers_version``: what was measured.
    """
    import torch
    import transformers
    from transformers import DynamicCache

    from .transformers import KvCoreCache

    if repeats < 1 or warmup < 0 or batch_size < 1 or new_tokens < 1:
        raise ValueError(f"repeats, batch_size and new_tokens must be >= 1 and warmup >= 0, "
                         f"got repeats={repeats}, warmup={warmup}, batch_size={batch_size}, "
                         f"new_tokens={new_tokens}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shape = dict(model_kwargs or {})
        model = tiny_llama(**shape)
        cfg = model.config
        ids, mask = ragged_prompts(batch_size, prompt_len, cfg.vocab_size,
                                   shared_prefix=shared_prefix)
        rows = batch_size * num_beams
        blocks = rows * (-(-(prompt_len + new_tokens) // block_size) + 1) + 8
        cache = KvCoreCache.from_model(model, backend=backend, num_blocks=blocks,
                                       block_size=block_size)
        manager = cache.manager
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams)

        def run_dynamic() -> tuple[float, Any]:
            began = time.perf_counter()
            out = model.generate(cache=DynamicCache(config=cfg), **gen)
            return time.perf_counter() - began, out

        def run_kvcore() -> tuple[float, Any, dict[str, Any]]:
            manager.gc()
            kv = KvCoreCache(manager)
            kv.set_prompts(ids, mask)
            began = time.perf_counter()
            out = model.generate(cache=kv, **gen)
            took = time.perf_counter() - began
            stats = manager.stats().model_dump(mode="json")
            kv.release()
            return took, out, stats

        say = progress or (lambda message: None)
        for i in range(warmup):
            say(f"warm-up {i + 1}/{warmup}")
            run_dynamic()
            run_kvcore()
        dyn_s, kv_s, identical, stats = [], [], True, {}
        for i in range(repeats):
            say(f"round {i + 1}/{repeats}")
            took, expect = run_dynamic()
            dyn_s.append(took)
            took, got, stats = run_kvcore()
            kv_s.append(took)
            identical = identical and bool(torch.equal(got, expect))
    finally:
        torch.set_num_threads(before)
    tokens = batch_size * new_tokens
    kv_med, dyn_med = statistics.median(kv_s), statistics.median(dyn_s)
    return {
        "kvcore_tokens_per_s": tokens / kv_med,
        "dynamic_tokens_per_s": tokens / dyn_med,
        "kvcore_s": kv_med,
        "dynamic_s": dyn_med,
        "ratio": dyn_med / kv_med,
        "identical": identical,
        "cache_stats": stats,
        "backend": backend,
        "batch_size": batch_size,
        "prompt_lengths": [int(n) for n in mask.sum(dim=1).tolist()],
        "new_tokens": new_tokens,
        "num_beams": num_beams,
        "repeats": repeats,
        "warmup": warmup,
        "block_size": block_size,
        "shared_prefix": shared_prefix,
        "threads": threads,
        "model": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "vocab_size": cfg.vocab_size},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
