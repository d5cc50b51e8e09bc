"""A multi-turn chat as a benchmark: time to first token per turn, kvcore reusing the
conversation it already holds vs ``DynamicCache`` recomputing it.

Each turn's prompt is the whole conversation so far (a history, then for every turn a
user message and the model's reply), as a chat application sends it.  With
``DynamicCache`` every turn computes the whole prompt.  With kvcore each turn is a new
:class:`KvCoreCache` on one shared manager: ``set_prompts`` finds the blocks earlier
turns left in the prefix cache (their prompts, and their replies: the decode steps
extended the rows with their token ids, :func:`track_token_ids`) and ``generate``
computes only the columns after them.  Both run in one process on the same random
model, turn by turn, so load drift hits both alike; each repeat starts from a cold
prefix cache.  Imports torch and transformers when called.

``python -m kvcore.integrations._chat_bench [--json] [--realistic]`` prints the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["benchmark_chat"]

#: The "realistic" layout of issue 14: 24 layers, hidden 896, 14 heads (head_dim 64),
#: 2 KV heads (a Qwen2-0.5B-like shape), random weights.
REALISTIC = dict(num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                 vocab_size=4096)


def benchmark_chat(*, backend: str = "torch", history: int = 1024, turns: int = 4,
                   user_tokens: int = 32, reply_tokens: int = 32, block_size: int = 16,
                   repeats: int = 3, threads: int | None = 1,
                   model_kwargs: dict[str, Any] | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time to first token of each turn of a greedy chat, kvcore vs DynamicCache.

    Returns a JSON-serialisable dict: ``turns`` (per turn: ``prompt_tokens``,
    ``reused_tokens`` (columns kvcore did not compute), ``kvcore_ttft_s``,
    ``dynamic_ttft_s``, ``speedup`` (dynamic / kvcore), medians over the repeats),
    ``identical`` (every turn's tokens equal in every repeat), and what was measured.
    """
    import torch
    import transformers
    from transformers import DynamicCache

    from ._generation_bench import tiny_llama
    from .transformers import KvCoreCache, track_token_ids

    if repeats < 1 or turns < 1 or history < 1 or reply_tokens < 1:
        raise ValueError(f"repeats, turns, history and reply_tokens must be >= 1, got "
                         f"repeats={repeats}, turns={turns}, history={history}, "
                         f"reply_tokens={reply_tokens}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    say = progress or (lambda message: None)
    try:
        shape = dict(model_kwargs or {})
        model = tiny_llama(seed=seed, **shape)
        vocab = model.config.vocab_size
        track_token_ids(model)
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(2, vocab, (1, history), generator=gen)
        users = [torch.randint(2, vocab, (1, user_tokens), generator=gen) for _ in range(turns)]
        longest = history + turns * (user_tokens + reply_tokens)
        blocks = 4 * (-(-longest // block_size)) + 16
        cache = KvCoreCache.from_model(model, backend=backend, num_blocks=blocks,
                                       block_size=block_size)
        manager = cache.manager
        first_forward: list[float] = []
        hook = model.register_forward_hook(
            lambda *a: first_forward.append(time.perf_counter()) if not first_forward else None)

        def timed(ids: Any, kv: Any) -> tuple[float, int, Any]:
            """(time to first token, columns the cache already held, tokens)."""
            first_forward.clear()
            began = time.perf_counter()
            if kv is None:
                kv = DynamicCache(config=model.config)
            else:
                kv.set_prompts(ids)  # allocation and prefix lookup count in the time
            held = kv.get_seq_length()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 cache=kv, max_new_tokens=reply_tokens,
                                 min_new_tokens=reply_tokens, do_sample=False)
            return first_forward[0] - began, held, out

        ttft: dict[str, list[list[float]]] = {"kvcore": [[] for _ in range(turns)],
                                              "dynamic": [[] for _ in range(turns)]}
        reused = [0] * turns
        prompt_tokens = [0] * turns
        identical = True
        try:
            for r in range(repeats + 1):  # the first round warms up, untimed
                manager.reset_prefix_cache()
                manager.gc()
                conversation = start
                for t in range(turns):
                    ids = torch.cat([conversation, users[t]], dim=1)
                    say(f"round {r}/{repeats} turn {t + 1}/{turns}: {ids.shape[1]} tokens")
                    kv = KvCoreCache(manager)
                    if r % 2:  # alternate which cache runs first
                        d_first, _, expect = timed(ids, None)
                        k_first, reused[t], got = timed(ids, kv)
                    else:
                        k_first, reused[t], got = timed(ids, kv)
                        d_first, _, expect = timed(ids, None)
                    kv.release()  # its blocks stay in the prefix cache for the next turn
                    identical = identical and bool(torch.equal(got, expect))
                    prompt_tokens[t] = int(ids.shape[1])
                    if r:
                        ttft["dynamic"][t].append(d_first)
                        ttft["kvcore"][t].append(k_first)
                    conversation = expect
        finally:
            hook.remove()
    finally:
        torch.set_num_threads(before)
    rows = []
    for t in range(turns):
        k, d = statistics.median(ttft["kvcore"][t]), statistics.median(ttft["dynamic"][t])
        rows.append({"turn": t + 1, "prompt_tokens": prompt_tokens[t],
                     "reused_tokens": reused[t], "kvcore_ttft_s": k, "dynamic_ttft_s": d,
                     "speedup": d / k})
    cfg = model.config
    return {
        "turns": rows,
        "identical": identical,
        "backend": backend,
        "history": history, "user_tokens": user_tokens, "reply_tokens": reply_tokens,
        "block_size": block_size, "repeats": repeats, "threads": threads,
        "model": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "vocab_size": cfg.vocab_size},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcore.integrations._chat_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--history", type=int, default=1024)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--realistic", action="store_true",
                   help="24 layers, hidden 896, 14 heads, 2 KV heads (default: the tiny "
                        "Llama of the generate benchmark)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = benchmark_chat(backend=args.backend, history=args.history, turns=args.turns,
                            repeats=args.repeats,
                            model_kwargs=REALISTIC if args.realistic else None,
                            progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {result['model']}, history {result['history']}, {result['user_tokens']} "
          f"user + {result['reply_tokens']} reply tokens per turn, medians of "
          f"{result['repeats']}; tokens identical: {result['identical']}")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'kvcore TTFT':>12} "
          f"{'DynamicCache':>13} {'speedup':>8}")
    for row in result["turns"]:
        print(f"{row['turn']:>4} {row['prompt_tokens']:>7} {row['reused_tokens']:>7} "
              f"{row['kvcore_ttft_s'] * 1e3:>10.2f}ms {row['dynamic_ttft_s'] * 1e3:>11.2f}ms "
              f"{row['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
