"""Workload sizes: the defaults of the issue, the ``--quick`` sizes, and their flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["BenchParams", "QUICK"]


@dataclass(frozen=True)
class BenchParams:
    """Every size the workloads take.  Defaults are the figures the issue specifies."""

    # append / read / fork: the model shape
    layers: int = 8
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "float16"
    block_size: int = 16
    # append / read
    batch: int = 16
    prompt: int = 512
    decode_steps: int = 256
    # blocks
    pool_blocks: int = 65536
    sequences: int = 4096
    max_prompt: int = 2048
    appends: int = 128
    shared_prefix: int = 1024
    #: Sequences allocated again from a fully cached prompt (per-hit cost).
    hit_sequences: int = 512
    # fork
    fork_tokens: int = 4096
    fork_children: int = 64
    # prompt_copy
    copy_prompt: int = 1024
    copies: int = 8
    # memory
    memory_tokens: int = 32768
    # measurement
    repeats: int = 3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: Small enough that every workload runs in about a second per backend (tests, CI).
QUICK = replace(BenchParams(), layers=2, kv_heads=2, head_dim=64, batch=4, prompt=64,
                decode_steps=16, pool_blocks=4096, sequences=256, max_prompt=256,
                appends=16, shared_prefix=128, hit_sequences=32, fork_tokens=256,
                fork_children=8, copy_prompt=64, copies=4, repeats=2)
