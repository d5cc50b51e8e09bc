"""One side of the two-process test: ``python -m tests.store_peer write|read URL KEYHEX``.

Both sides derive the same prompt and the same K/V from fixed seeds, but share nothing
at run time except the store URL and the ``hash_key``: the writer offers the prompt's
blocks and flushes; the reader, a fresh process, computes the chain keys itself,
fetches the run and checks every byte.  Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import kvcore
from kvcore.stores import StoreConnector, block_layout, chain_keys

CONFIG = kvcore.CacheConfig(num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                            block_size=16, num_blocks=64)
PROMPT_TOKENS = 200  # 12 full blocks and a partial one, which never travels
SALT = "tenant-1"


def prompt() -> np.ndarray:
    return np.random.default_rng(2024).integers(0, 128000, PROMPT_TOKENS)


def block_kv(index: int) -> list[np.ndarray]:
    rng = np.random.default_rng(10_000 + index)
    return [rng.integers(0, 2**16, s.shape, dtype=np.uint16) for s in block_layout(CONFIG)]


def main(argv: list[str]) -> int:
    role, url, key_hex = argv
    hash_key = bytes.fromhex(key_hex)
    full = PROMPT_TOKENS // CONFIG.block_size
    tokens = prompt()[:full * CONFIG.block_size].reshape(full, CONFIG.block_size)
    digests = chain_keys(None, tokens, SALT, hash_key)
    with StoreConnector.open(url, CONFIG, model_id="tiny-llama", namespace="two-proc") as conn:
        if role == "write":
            conn.offer([(d, block_kv(i)) for i, d in enumerate(digests)])
            drained = conn.flush(30)
            stats = conn.stats()
            print(json.dumps({"role": role, "drained": drained,
                              "written": stats.blocks_written + stats.blocks_skipped_existing,
                              "blocks": full}))
            return 0 if drained else 1
        run = conn.fetch_run(digests)
        identical = all(a.tobytes() == b.tobytes() for i, got in enumerate(run)
                        for a, b in zip(got, block_kv(i)))
        stats = conn.stats()
        print(json.dumps({"role": role, "hits": stats.hits, "blocks": full,
                          "hit_rate": stats.hit_rate, "bit_identical": identical,
                          "errors": stats.errors}))
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
