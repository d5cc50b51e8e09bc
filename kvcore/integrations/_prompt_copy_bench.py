"""Copies of a prompt cache as a benchmark: K/V bytes held by N ``copy.deepcopy``s of
a prefilled :class:`KvCoreCache` against N deep copies of a ``DynamicCache``.

transformers' prompt-reuse recipe copies the prefilled cache once per request.  A
``DynamicCache`` copy duplicates every tensor; a ``KvCoreCache`` copy forks the rows,
so its blocks are shared until a copy writes.  Both run on the same randomly
initialised Llama-shaped model (nothing downloaded), in the same process.  Imports
torch and transformers when called, never at import.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["benchmark_prompt_copy"]


def _dynamic_bytes(cache: Any) -> int:
    """Bytes of K/V tensors a DynamicCache holds."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def benchmark_prompt_copy(*, backend: str = "torch", prompt_len: int = 1024, copies: int = 8,
                          block_size: int = 16, threads: int | None = 1, seed: int = 0,
                          repeats: int = 3, model_kwargs: dict[str, Any] | None = None,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prefill a ``prompt_len``-token prompt into a DynamicCache and a KvCoreCache, make
    ``copies`` deep copies of each, then let every copy compute one more token (its
    first write).  K/V bytes held are measured after the copies and after that token:
    for kvcore, the manager's used blocks times the bytes of a block; for DynamicCache,
    the ``nbytes`` of every tensor of the original and its copies.

    Returns a JSON-serialisable dict: ``kvcore_bytes`` / ``dynamic_bytes`` (original and
    copies, after copying), ``kvcore_copy_bytes`` / ``dynamic_copy_bytes`` (what the
    copies added), ``kvcore_bytes_after_token`` / ``dynamic_bytes_after_token``,
    ``kvcore_copy_s`` / ``dynamic_copy_s`` (median seconds of one copy over
    ``repeats`` rounds), ``copy_on_write_copies``, ``identical`` (each copy's next
    token equal between the two caches), and what was measured.
    """
    import torch
    import transformers
    from transformers import DynamicCache

    from ._generation_bench import tiny_llama
    from .transformers import KvCoreCache

    if prompt_len < 1 or copies < 1 or repeats < 1:
        raise ValueError(f"prompt_len, copies and repeats must be >= 1, got {prompt_len}, "
                         f"{copies}, {repeats}")
    say = progress or (lambda message: None)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = tiny_llama(**(model_kwargs or {}))
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, cfg.vocab_size, (1, prompt_len), generator=gen)
        blocks = -(-(prompt_len + 1) // block_size) * (copies + 1) + 8
        paged = KvCoreCache.from_model(model, backend=backend, num_blocks=blocks,
                                       block_size=block_size)
        manager = paged.manager
        dynamic = DynamicCache(config=cfg)
        say(f"prefill of {prompt_len} tokens into both caches")
        with torch.no_grad():
            model(input_ids=ids, cache=dynamic)
            model(input_ids=ids, cache=paged)
        per_block = manager.config.bytes_per_block

        def used() -> int:
            return manager.stats().used_blocks * per_block

        original = {"kvcore": used(), "dynamic": _dynamic_bytes(dynamic)}
        copy_s: dict[str, list[float]] = {"kvcore": [], "dynamic": []}
        for r in range(repeats):
            say(f"round {r + 1}/{repeats}: {copies} copies of each")
            made: dict[str, list[Any]] = {}
            for name, source in (("dynamic", dynamic), ("kvcore", paged)):
                began = time.perf_counter()
                made[name] = [copy.deepcopy(source) for _ in range(copies)]
                copy_s[name].append((time.perf_counter() - began) / copies)
            held = {"kvcore": used(),
                    "dynamic": original["dynamic"] + sum(map(_dynamic_bytes, made["dynamic"]))}
            cow_before = manager.stats().copy_on_write_copies
            # Each copy computes its next token: its first write.
            nxt = torch.randint(2, cfg.vocab_size, (copies, 1), generator=gen)
            tokens: dict[str, list[int]] = {}
            for name in ("dynamic", "kvcore"):
                tokens[name] = []
                for i, c in enumerate(made[name]):
                    with torch.no_grad():
                        out = model(input_ids=nxt[i:i + 1], cache=c)
                    tokens[name].append(int(out.logits[0, -1].argmax()))
            after = {"kvcore": used(),
                     "dynamic": original["dynamic"] + sum(map(_dynamic_bytes, made["dynamic"]))}
            cow = manager.stats().copy_on_write_copies - cow_before
            identical = tokens["kvcore"] == tokens["dynamic"]
            for c in made["kvcore"]:
                c.release()
            if not identical:
                break
    finally:
        torch.set_num_threads(before)
    return {
        "kvcore_bytes": held["kvcore"],
        "dynamic_bytes": held["dynamic"],
        "kvcore_original_bytes": original["kvcore"],
        "dynamic_original_bytes": original["dynamic"],
        "kvcore_copy_bytes": held["kvcore"] - original["kvcore"],
        "dynamic_copy_bytes": held["dynamic"] - original["dynamic"],
        "kvcore_bytes_after_token": after["kvcore"],
        "dynamic_bytes_after_token": after["dynamic"],
        "kvcore_copy_s": statistics.median(copy_s["kvcore"]),
        "dynamic_copy_s": statistics.median(copy_s["dynamic"]),
        "copy_on_write_copies": cow,
        "identical": identical,
        "backend": backend,
        "prompt_len": prompt_len,
        "copies": copies,
        "block_size": block_size,
        "bytes_per_block": per_block,
        "pool_bytes": manager.config.total_bytes,
        "repeats": repeats,
        "threads": threads,
        "dtype": str(manager.config.dtype),
        "model": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "vocab_size": cfg.vocab_size},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
