"""The ``memory`` workload: bytes of KV per token, and tokens that fit in 1 GiB.

Three layouts of real models, each with float16 and with every quantized codec, for
one generation of ``memory_tokens`` tokens (32,768 by default):

* ``full``: a Llama-3-8B-like full-attention model (32 layers, 8 KV heads of 128);
* ``sliding``: a Mistral-7B-v0.1-like model (the same heads, every layer a sliding
  window of 4,096 tokens);
* ``mla``: a DeepSeek-V2-Lite-like latent layout (27 layers, one vector of 512 + 64
  per token and layer).

What kvcore holds is measured: a manager of the real layout is allocated on the
backend and its pools' bytes per block counted (``nbytes`` of every pool, codes and
scales included); the blocks a sequence holds after growing to ``memory_tokens`` in
steps of one block are counted on a manager of the same groups with one-element
heads (the same block accounting, kilobytes instead of gigabytes).

The baseline is transformers' default cache (``DynamicCache``) for the same
generation, in float16.  Its bytes are *computed* for the big layouts, from formulas
*measured* here on tiny random-weight models of the same families (Llama, Mistral with
a sliding window, DeepSeek-V2), summing the storage of the cache's tensors (a sliding
layer's tensors are views into a window-sized buffer, which is what stays allocated);
``details["transformers_measured"]`` shows each formula against the measurement.
Without transformers installed the formulas are used unmeasured, and the label says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._backend import Backend
from .._device import DType
from .._manager import KvCacheManager
from ..errors import UnsupportedError
from ..models import AllocationRequest, CacheConfig, LayerGroup
from ._params import BenchParams
from ._result import Figure, WorkloadResult
from ._timing import Progress, clock

__all__ = ["LAYOUTS", "measure_transformers", "run_memory", "transformers_bytes"]

GIB = 2**30
BLOCK_SIZE = 16
DTYPES = (DType.float16, DType.float8_e4m3, DType.float8_e5m2, DType.int8)


@dataclass(frozen=True)
class Layout:
    """A model's KV layout: kvcore's groups, and what transformers' cache keeps."""

    name: str
    model: str
    layers: int
    kv_heads: int
    head_dim: int
    window: int | None = None
    latent: int | None = None

    def config(self, dtype: DType, num_blocks: int, *, proxy: bool = False) -> CacheConfig:
        """The kvcore config (``proxy``: one-element heads, the same block accounting)."""
        heads, dim = (1, 1) if proxy else (self.kv_heads, self.head_dim)
        layers = tuple(range(self.layers))
        groups: tuple[LayerGroup, ...] = ()
        if self.window is not None:
            groups = (LayerGroup(kind="sliding", layers=layers, window=self.window),)
        elif self.latent is not None:
            groups = (LayerGroup(kind="latent", layers=layers,
                                 latent_dim=1 if proxy else self.latent),)
        return CacheConfig(num_layers=self.layers, num_kv_heads=heads, head_dim=dim,
                           dtype=dtype, block_size=BLOCK_SIZE, num_blocks=num_blocks,
                           layer_groups=groups, enable_prefix_caching=False)

    def transformers_bytes(self, tokens: int, itemsize: int = 2) -> int:
        return transformers_bytes(self, tokens, itemsize)


#: The three layouts (model shapes from the models' published configs).
LAYOUTS = (
    Layout("full", "Llama-3-8B-like", 32, 8, 128),
    Layout("sliding", "Mistral-7B-v0.1-like", 32, 8, 128, window=4096),
    Layout("mla", "DeepSeek-V2-Lite-like", 27, 1, 576, latent=512 + 64),
)


def transformers_bytes(layout: Layout, tokens: int, itemsize: int = 2) -> int:
    """Bytes transformers' ``DynamicCache`` holds after ``tokens`` tokens: every token
    of a full layer; a window's worth in a sliding layer (``DynamicSlidingWindowLayer``
    keeps views of the last ``window - 1`` tokens into a ``window``-token buffer); the
    compressed latent (``kv_lora_rank`` keys plus rope keys) of DeepSeek-V2 layers."""
    if layout.latent is not None:
        return layout.layers * tokens * layout.latent * itemsize
    held = tokens if layout.window is None else min(tokens, layout.window)
    return layout.layers * held * 2 * layout.kv_heads * layout.head_dim * itemsize


# --- transformers, measured on tiny models -----------------------------------------------


def _tiny_layouts() -> list[tuple[str, Layout, Callable[[], Any]]]:
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    deepseek = tf.DeepseekV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return [
        ("llama", Layout("full", "tiny llama", 2, 2, 16),
         lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common))),
        ("mistral", Layout("sliding", "tiny mistral", 2, 2, 16, window=8),
         lambda: tf.MistralForCausalLM(tf.MistralConfig(sliding_window=8, **common))),
        ("deepseek_v2", Layout("mla", "tiny deepseek-v2", 2, 1, 40, latent=32 + 8),
         lambda: tf.DeepseekV2ForCausalLM(deepseek)),
    ]


def _storage_bytes(cache: Any) -> int:
    """Bytes of the distinct storages behind a transformers cache's tensors."""
    import torch

    seen: dict[int, int] = {}
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_transformers(new_tokens: int = 24) -> list[dict[str, Any]]:
    """Each tiny model's ``DynamicCache`` after a greedy generation: bytes measured
    (float32 tensors) against :func:`transformers_bytes`."""
    import torch
    import transformers as tf

    out = []
    for family, layout, build in _tiny_layouts():
        torch.manual_seed(0)
        model = build().eval()
        ids = torch.randint(2, 100, (1, 8), generator=torch.Generator().manual_seed(0))
        cache = tf.DynamicCache(config=model.config)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
        tokens = cache.get_seq_length()
        out.append({"model": family, "tokens": tokens, "measured_bytes": _storage_bytes(cache),
                    "formula_bytes": transformers_bytes(layout, tokens, itemsize=4)})
    return out


# --- kvcore, measured on the backend -----------------------------------------------------


def _pool_bytes_per_block(backend: Backend, layout: Layout, dtype: DType) -> int:
    """Bytes of one block of every pool of the real layout on ``backend``."""
    blocks = 2
    with KvCacheManager(layout.config(dtype, blocks), backend=backend) as mgr:
        total = sum(int(ref.native.nbytes) for layer in range(layout.layers)
                    for ref in mgr.layer_pools(layer))
    return total // blocks


def _blocks_held(layout: Layout, tokens: int) -> int:
    """Blocks one sequence holds after growing to ``tokens`` one block at a time."""
    need = -(-tokens // BLOCK_SIZE) if layout.window is None else \
        -(-layout.window // BLOCK_SIZE) + 2
    with KvCacheManager(layout.config(DType.float32, need, proxy=True), backend="numpy") as mgr:
        handle = mgr.allocate(AllocationRequest(request_id="m", num_tokens=0))
        done = 0
        while done < tokens:
            step = min(BLOCK_SIZE, tokens - done)
            mgr.extend(handle, step)
            done += step
        return handle.stats().blocks_allocated


def run_memory(backend: Backend, p: BenchParams, progress: Progress) -> WorkloadResult:
    """The whole ``memory`` workload on ``backend``."""
    began = clock()
    tokens = p.memory_tokens
    result = WorkloadResult("memory", backend.name)
    measured: list[dict[str, Any]] | None = None
    if importlib.util.find_spec("transformers") is not None:
        progress(f"[{backend.name}] memory: transformers' DynamicCache on tiny models")
        measured = measure_transformers()
    exact = measured is not None and all(m["measured_bytes"] == m["formula_bytes"]
                                         for m in measured)
    how = ("computed; the formula matched DynamicCache measured on tiny models" if exact else
           "computed; NOT matched on tiny models (see details)" if measured is not None else
           "computed; transformers not installed to measure it")
    details: dict[str, Any] = {"tokens": tokens, "block_size": BLOCK_SIZE,
                               "transformers_measured": measured, "layouts": {}}
    caps = backend.capabilities()
    for layout in LAYOUTS:
        progress(f"[{backend.name}] memory: {layout.name} ({layout.model})")
        held = _blocks_held(layout, tokens)
        theirs = layout.transformers_bytes(tokens) / tokens
        info: dict[str, Any] = {"model": layout.model, "blocks_held": held,
                                "transformers_float16_bytes": layout.transformers_bytes(tokens)}
        for dtype in DTYPES:
            if dtype.is_codec and dtype not in caps.codecs:
                info[dtype.value] = caps.unsupported_codecs.get(dtype, "codec not served")
                continue
            try:
                per_block = _pool_bytes_per_block(backend, layout, dtype)
            except UnsupportedError as exc:
                info[dtype.value] = str(exc)
                continue
            if per_block != layout.config(dtype, 1).bytes_per_block:
                raise RuntimeError(f"{layout.name}/{dtype.value}: pools hold {per_block} bytes "
                                   f"per block, the config says "
                                   f"{layout.config(dtype, 1).bytes_per_block}")
            ours = held * per_block / tokens
            label = f"transformers DynamicCache, float16 ({how})"
            result.add(Figure(f"{layout.name}/{dtype.value} bytes_per_token", ours, "B", theirs,
                              label, ours / theirs, "kvcore / transformers (lower holds less)"))
            result.add(Figure(f"{layout.name}/{dtype.value} tokens_per_GiB", GIB / ours, "tok",
                              GIB / theirs, label, theirs / ours,
                              "kvcore / transformers (higher fits more)"))
            info[dtype.value] = {"pool_bytes_per_block": per_block,
                                 "bytes_held": held * per_block}
        details["layouts"][layout.name] = info
    result.details = details
    result.wall_s = clock() - began
    return result
