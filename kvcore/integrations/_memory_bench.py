"""K/V memory held during ``generate()``: kvcore's blocks against ``DynamicCache``'s
tensors, for the layouts where paging should win.

Three generations, each run with both caches on the same random model (nothing
downloaded), in one process, with identical tokens checked:

* ``beam_search``: one prompt, beam search with 4 beams.  ``DynamicCache`` holds the prompt
  once per beam (generate repeats the input) and copies every beam's K/V when beams are
  reselected; kvcore writes the prompt once and forks it, copying only a reselected
  beam's partly filled last block.
* ``shared_prefix``: a batch of 8 prompts sharing their first 512 tokens, greedy.
  kvcore stores the shared blocks once (``set_prompts``: prefix sharing within the
  batch); ``DynamicCache`` holds every row's copy, padding included.
* ``sliding_window``: a Mistral-shaped model with a 64-token window generating 4 windows'
  worth; both bound it (``DynamicCache`` keeps ``window - 1`` tokens, kvcore the blocks
  the window still reads), so this one shows the cost of whole blocks.

Bytes are measured after every forward pass (a forward hook): for kvcore the manager's
``used_memory_bytes`` (blocks in use times their bytes; the pool itself is allocated up
front), for ``DynamicCache`` the ``nbytes`` of every K/V tensor it holds.  The figure is
the peak over the generation.  ``python -m kvcore.integrations._memory_bench`` prints
them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["benchmark_kv_memory"]


def _dynamic_bytes(cache: Any) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(getattr(t, "nbytes", None), int))


def _tiny_mistral(window: int, seed: int) -> Any:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=None)).eval()


def benchmark_kv_memory(*, backend: str = "torch", prefix: int = 512, batch: int = 8,
                        suffix: int = 16, beams: int = 4, beam_prompt: int = 512,
                        new_tokens: int = 32, window: int = 64, block_size: int = 16,
                        threads: int | None = 1, seed: int = 0,
                        model_kwargs: dict[str, Any] | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Peak K/V bytes of the three generations above.  Returns a JSON-serialisable
    dict: per scenario ``kvcore_peak_bytes``, ``dynamic_peak_bytes``, ``ratio``
    (kvcore / DynamicCache), ``identical``, and what was measured."""
    import torch
    import transformers
    from transformers import DynamicCache

    from ._generation_bench import tiny_llama
    from .transformers import KvCoreCache

    say = progress or (lambda message: None)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)

    def run(model: Any, ids: Any, mask: Any, **kwargs: Any) -> dict[str, Any]:
        longest = ids.shape[1] + kwargs["max_new_tokens"]
        rows = ids.shape[0] * kwargs.get("num_beams", 1)
        blocks = rows * (-(-longest // block_size) + 2) + 16
        peaks: dict[str, int] = {}
        outs = {}
        for name in ("dynamic", "kvcore"):
            if name == "dynamic":
                cache: Any = DynamicCache(config=model.config)
                measure: Callable[[], int] = lambda: _dynamic_bytes(cache)  # noqa: E731
            else:
                cache = KvCoreCache.from_model(model, backend=backend, num_blocks=blocks,
                                               block_size=block_size)
                cache.set_prompts(ids, mask)
                manager = cache.manager
                measure = lambda: manager.stats().used_memory_bytes  # noqa: E731
            peak = [measure()]
            hook = model.register_forward_hook(lambda *a: peak.append(measure()))
            try:
                outs[name] = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                            do_sample=False,
                                            min_new_tokens=kwargs["max_new_tokens"],
                                            **kwargs)
            finally:
                hook.remove()
            peaks[name] = max(peak)
            if name == "kvcore":
                cache.release()
        return {"kvcore_peak_bytes": peaks["kvcore"], "dynamic_peak_bytes": peaks["dynamic"],
                "ratio": peaks["kvcore"] / peaks["dynamic"],
                "identical": bool(torch.equal(outs["kvcore"], outs["dynamic"]))}

    try:
        model = tiny_llama(seed=seed, **(model_kwargs or {}))
        vocab = model.config.vocab_size
        out: dict[str, Any] = {}
        say(f"beam search: {beams} beams, a {beam_prompt}-token prompt")
        ids = torch.randint(2, vocab, (1, beam_prompt), generator=gen)
        out["beam_search"] = run(model, ids, torch.ones_like(ids), num_beams=beams,
                           max_new_tokens=new_tokens)
        say(f"shared prefix: {batch} prompts sharing {prefix} tokens")
        common = torch.randint(2, vocab, (prefix,), generator=gen)
        width = prefix + suffix
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i in range(batch):  # ragged own parts, left-padded
            own = torch.randint(2, vocab, (suffix - i % 4,), generator=gen)
            row = torch.cat([common, own])
            ids[i, width - row.numel():] = row
            mask[i, width - row.numel():] = 1
        out["shared_prefix"] = run(model, ids, mask, max_new_tokens=new_tokens)
        say(f"sliding window: {window} tokens, {4 * window} new")
        sliding = _tiny_mistral(window, seed)
        ids = torch.randint(2, 512, (2, window), generator=gen)
        out["sliding_window"] = run(sliding, ids, torch.ones_like(ids), max_new_tokens=4 * window)
    finally:
        torch.set_num_threads(before)
    cfg = model.config
    out.update({
        "backend": backend, "prefix": prefix, "batch": batch, "suffix": suffix,
        "beams": beams, "beam_prompt": beam_prompt, "new_tokens": new_tokens,
        "window": window, "block_size": block_size,
        "model": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcore.integrations._memory_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = benchmark_kv_memory(backend=args.backend,
                                 progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {result['model']}, blocks of {result['block_size']}, peak K/V bytes held")
    print(f"{'generation':<14} {'kvcore':>12} {'DynamicCache':>13} {'ratio':>7} identical")
    for name in ("beam_search", "shared_prefix", "sliding_window"):
        r = result[name]
        print(f"{name:<14} {r['kvcore_peak_bytes']:>12,} {r['dynamic_peak_bytes']:>13,} "
              f"{r['ratio']:>7.3f} {r['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
