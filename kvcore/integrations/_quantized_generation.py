"""How a quantized KV cache changes generation: greedy tokens and logits of tiny
random-weight transformers models with K/V stored by a kvcore codec, against
transformers' own float cache (``DynamicCache``).

The cache here is deliberately small and separate from :mod:`kvcore.integrations.transformers`:
one sequence (batch 1, no padding), every layer's K/V written to a kvcore manager of
the codec and read back decoded (``handle.key_cache``), so what the model attends to
is exactly what the codec stored.  :func:`measure` runs one model and codec;
``python -m kvcore.integrations._quantized_generation`` prints the table that
``docs/quantized-kv.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .._device import DType
from .._manager import KvCacheManager
from ..models import AllocationRequest
from .transformers import cache_config_for

__all__ = ["Agreement", "MODELS", "main", "measure", "tiny_model"]


class _CodecLayer(DynamicLayer):
    """A DynamicLayer whose tensors are what the kvcore codec cache reads back."""

    def __init__(self, owner: _CodecCache, layer: int) -> None:
        super().__init__()
        self._owner = owner
        self._layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._owner.write_and_read(self._layer, key_states,
                                                            value_states)
        return self.keys, self.values


class _CodecCache(Cache):
    """Batch-1 transformers cache storing K/V in ``manager`` (any dtype or codec)."""

    def __init__(self, manager: KvCacheManager) -> None:
        self.manager = manager
        super().__init__(layers=[_CodecLayer(self, i)
                                 for i in range(manager.config.num_layers)])
        self.handle = None
        self.length = 0

    def write_and_read(self, layer: int, key: torch.Tensor,
                       value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key.shape[0] != 1:
            raise ValueError("the measurement cache holds one sequence (batch 1)")
        n = key.shape[2]
        mgr = self.manager
        if layer == 0:
            if self.handle is None:
                self.handle = mgr.allocate(AllocationRequest(request_id="m", num_tokens=n))
            else:
                mgr.extend(self.handle, n)
            self.length += n
        dtype = mgr.config.compute_dtype.value
        rows = [t[0].transpose(0, 1).to(getattr(torch, dtype)).contiguous()
                for t in (key, value)]
        mgr.write(self.handle, layer, rows[0], rows[1], start=self.length - n)
        k, v = (ref.native for ref in self.handle.kv_cache(layer))  # decoded
        return (k.to(key.dtype).transpose(0, 1)[None],
                v.to(value.dtype).transpose(0, 1)[None])


@dataclass
class Agreement:
    """Greedy tokens and logits of one model with one cache dtype, against the float
    cache over ``new_tokens`` steps, for ``prompts`` prompts."""

    model: str
    dtype: str
    prompts: int
    new_tokens: int
    #: Fraction of generated positions whose token equals the float cache's.
    token_match: float
    #: Prompts whose first 16 generated tokens all equal the float cache's.
    first16_identical: int
    #: The earliest step (0-based) at which any prompt's token differed (None: never).
    first_divergence: int | None
    #: Largest |logit - float cache's logit| over the steps before each prompt's first
    #: divergence (same context), and the logits' range, for scale.
    max_logit_error: float
    logit_range: float
    #: The largest gap between the float cache's two best logits at a step where the
    #: tokens first differed (None: never): a divergence at a gap below the logit
    #: error is a near tie, decided by rounding noise.
    divergence_margin: float | None = None


def _tiny(config_cls: Any, model_cls: Any, **fields: Any) -> Callable[[], Any]:
    def build() -> Any:
        torch.manual_seed(0)
        config = config_cls(**fields)
        return model_cls(config).eval()
    return build


def _models() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return {
        "llama": _tiny(tf.LlamaConfig, tf.LlamaForCausalLM, **common),
        "qwen2": _tiny(tf.Qwen2Config, tf.Qwen2ForCausalLM, **common),
        "qwen3": _tiny(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16, **common),
        "gemma": _tiny(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=16, **common),
        "phi": _tiny(tf.PhiConfig, tf.PhiForCausalLM, **common),
        "gpt_neox": _tiny(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                          **{k: v for k, v in common.items() if k != "num_key_value_heads"}),
        "gpt2": _tiny(tf.GPT2Config, tf.GPT2LMHeadModel, vocab_size=128, n_embd=64, n_layer=2,
                      n_head=4, n_positions=256, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0),
    }


#: Model name -> builder of its tiny random-weight model (float32, CPU).
MODELS: dict[str, Callable[[], Any]] = {}


def tiny_model(name: str) -> Any:
    if not MODELS:
        MODELS.update(_models())
    return MODELS[name]()


def _prompts(count: int, length: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(2, vocab, (1, length), generator=g) for _ in range(count)]


def _run(model: Any, ids: torch.Tensor, cache: Cache, new_tokens: int) -> tuple[list[int],
                                                                                torch.Tensor]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                         do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, torch.stack([step[0] for step in out.logits])


def measure(model_name: str, dtype: str, *, prompts: int = 4, prompt_tokens: int = 16,
            new_tokens: int = 64, backend: str = "torch", model: Any = None) -> Agreement:
    """Generate ``new_tokens`` greedily from ``prompts`` random prompts with the float
    cache and with a kvcore cache of ``dtype`` (computing in the model's dtype), and
    compare tokens and logits."""
    if model is None:
        model = tiny_model(model_name)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    matched = total = first16 = 0
    first_div: int | None = None
    worst = spread = 0.0
    margin: float | None = None
    with torch.no_grad():
        for ids in _prompts(prompts, prompt_tokens, vocab):
            ref_tokens, ref_logits = _run(model, ids, DynamicCache(config=model.config),
                                          new_tokens)
            # A codec computes in the model's float32; a float dtype is its own.
            codec = {"compute_dtype": "float32"} if DType.parse(dtype).is_codec else {}
            config = cache_config_for(model, num_blocks=64, block_size=16, dtype=dtype,
                                      **codec)
            with KvCacheManager(config, backend=backend) as manager:
                tokens, logits = _run(model, ids, _CodecCache(manager), new_tokens)
            same = [a == b for a, b in zip(tokens, ref_tokens)]
            matched += sum(same)
            total += len(same)
            first16 += all(same[:16])
            div = same.index(False) if False in same else None
            if div is not None:
                first_div = div if first_div is None else min(first_div, div)
                top2 = ref_logits[div].topk(2).values
                gap = float(top2[0] - top2[1])
                margin = gap if margin is None else max(margin, gap)
            upto = len(same) if div is None else div + 1  # the diverging step shares context
            worst = max(worst, float((logits[:upto] - ref_logits[:upto]).abs().max()))
            spread = max(spread, float(ref_logits.max() - ref_logits.min()))
    return Agreement(model_name, dtype, prompts, new_tokens, matched / total, first16,
                     first_div, worst, spread, margin)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcore.integrations._quantized_generation",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(_models()), help="comma-separated")
    p.add_argument("--dtypes", default="float16,bfloat16,float8_e4m3,float8_e5m2,int8")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--backend", default="torch")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model = tiny_model(name)
        for dtype in args.dtypes.split(","):
            rows.append(measure(name, dtype, prompts=args.prompts, new_tokens=args.new_tokens,
                                backend=args.backend, model=model))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    print("| model | cache dtype | greedy tokens equal | first 16 identical | first divergence "
          "| top-2 gap there | max logit error (logit range) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        div = "none" if r.first_divergence is None else f"step {r.first_divergence}"
        gap = "-" if r.divergence_margin is None else f"{r.divergence_margin:.1e}"
        print(f"| {r.model} | {r.dtype} | {r.token_match:.1%} | {r.first16_identical}/{r.prompts} "
              f"| {div} | {gap} | {r.max_logit_error:.1e} ({r.logit_range:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
