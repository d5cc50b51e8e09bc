"""``kvcore demo --generate``: a real model loop on kvcore, checked and timed."""

from __future__ import annotations

import sys

__all__ = ["run_generation_demo"]

#: The one command that installs what this demo needs (kvcore-torch and transformers).
GENERATE_HINT = 'pip install "kvcore[transformers]"'


def run_generation_demo(backend: str | None = None) -> int:
    """Greedy and beam-search ``generate()`` with a tiny random Llama on a kvcore cache.

    Checks the tokens against transformers' ``DynamicCache`` and prints tokens/s for
    both and the manager's statistics.  Returns 0 when every check holds, 1 when a
    check fails, 2 when torch/transformers or the backend cannot run here.
    """
    backend = backend or "torch"
    try:
        import torch
        import transformers  # noqa: F401  (a clear message below if it is missing)
    except ImportError as exc:
        print(f"kvcore demo --generate needs torch and transformers, which are not "
              f"installed here ({exc}): {GENERATE_HINT}", file=sys.stderr)
        return 2
    from .. import get_backend
    from ..errors import BackendError
    from ._generation_bench import benchmark_generation

    try:
        get_backend(backend)
    except BackendError as exc:
        print(f"backend {backend!r} cannot run here: {exc}", file=sys.stderr)
        return 2

    ok = True
    print(f"kvcore generation demo: backend={backend}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    for title, beams in (("greedy", 1), ("beam search (3 beams)", 3)):
        # Each run takes seconds: say what is running before it starts.
        print(f"running {title} generation ...", file=sys.stderr, flush=True)
        r = benchmark_generation(backend=backend, batch_size=4, prompt_len=40, new_tokens=24,
                                 repeats=3, num_beams=beams)
        m, s = r["model"], r["cache_stats"]
        if beams == 1:
            print(f"model: Llama, {m['layers']} layers, hidden {m['hidden_size']}, "
                  f"{m['heads']} heads / {m['kv_heads']} kv heads, random weights; "
                  f"prompts of {r['prompt_lengths']} tokens sharing the first "
                  f"{r['shared_prefix']}")
        same = "identical" if r["identical"] else "DIFFERENT"
        print(f"\n{title}: {r['new_tokens']} new tokens per prompt, tokens {same} to "
              "DynamicCache")
        print(f"  tokens/s  kvcore {r['kvcore_tokens_per_s']:8.1f}   DynamicCache "
              f"{r['dynamic_tokens_per_s']:8.1f}   (kvcore at {r['ratio']:.2f}x)")
        print(f"  cache: {s['used_blocks']}/{s['total_blocks']} blocks of {s['block_size']} "
              f"in use for {s['active_caches']} sequences, prefix hits "
              f"{s['prefix_cache_hits']}/{s['prefix_cache_queries']}, copy-on-write copies "
              f"{s['copy_on_write_copies']}, utilization {s['utilization']:.0%}")
        ok = ok and r["identical"]
    print("\nall checks passed" if ok else "\nFAILED: kvcore's tokens differ from DynamicCache's")
    return 0 if ok else 1
