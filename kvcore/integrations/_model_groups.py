"""Which kvcore layer groups a transformers model needs, read from its config.

The rule for which decoder layers slide, and with which window, is transformers' own:
the ``get_layer_types_and_kwargs`` that ``DynamicCache(config=...)`` calls (a layer's
``layer_types`` entry, else ``sliding_window`` / ``attention_chunk_size`` on its
config), so a kvcore cache bounds exactly the layers ``DynamicCache`` bounds:

* ``full_attention`` -> a ``full`` group;
* ``sliding_attention`` (Mistral, Qwen2 past ``max_window_layers``, the alternating
  layers of Gemma2/Gemma3, Cohere2, GPT-OSS, Olmo3) and ``chunked_attention``
  (Llama4: the cache keeps a sliding window of the chunk size, as ``DynamicCache``
  does; the mask does the chunking) -> a ``sliding`` group whose ``window`` is the
  layer's: a query at position ``p`` reads keys ``p - window + 1 .. p``, the
  ``kv_idx > q_idx - sliding_window`` of transformers' sliding mask;
* encoder-decoder models (T5, BART and their kin) -> the decoder's self-attention
  layers as above, then one ``cross`` group of as many layers for cross-attention.

What a layer stores is what the model hands ``cache.update``: ``num_key_value_heads``
heads (else ``num_attention_heads``) of ``head_dim`` (else ``hidden_size //
num_attention_heads``); Falcon's ``multi_query`` stores one head, its
``new_decoder_architecture`` every query head (transformers broadcasts the KV heads
before the cache sees them); DeepSeek-V3's latent attention (MLA) caches the
compressed latents, one head of ``kv_lora_rank`` as K and of ``qk_rope_head_dim`` as V
(a group whose K and V widths differ).  Everything else is refused early with
:class:`~kvcore.errors.UnsupportedError` naming the model type: state-space and
linear-attention layers (Mamba, Jamba, Zamba, ...), models with their own cache
classes, layers without attention or with shared KV, and latent (MLA) layouts whose
cached shapes this module does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._device import DType
from ..errors import UnsupportedError
from ..models import CacheConfig, GroupKind, LayerGroup

__all__ = ["ModelLayout", "cache_config_for", "model_layout"]

#: Layer types that keep a recurrent state instead of (or besides) attention K/V.
_STATE_SPACE = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding"})
#: Layer types a kvcore group holds, and the group kind.
_KINDS = {"full_attention": GroupKind.full, "sliding_attention": GroupKind.sliding,
          "chunked_attention": GroupKind.sliding}
#: Model types whose generate() does not use a transformers Cache at all.
_OWN_CACHE = frozenset({"reformer", "xlnet", "rwkv", "xlstm", "minimax"})
#: Latent-attention (MLA) models whose layers cache the compressed latents: the
#: normalised ``kv_lora_rank`` vector as K and the rotary key part as V, one head each
#: (checked against transformers' modeling code; tokens compared in the tests).
_LATENT_KV = frozenset({"deepseek_v3"})


@dataclass(frozen=True)
class ModelLayout:
    """The K/V shapes of a model's attention layers, as kvcore layer groups."""

    model_type: str
    #: Decoder (self-attention) layers; for encoder-decoder models the cross-attention
    #: layers follow them in the manager, ``decoder_layers .. 2 * decoder_layers - 1``.
    decoder_layers: int
    groups: tuple[LayerGroup, ...]
    encoder_decoder: bool
    #: The first group's shape: the config's defaults.
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return self.decoder_layers * (2 if self.encoder_decoder else 1)


def _name(config: Any) -> str:
    return str(getattr(config, "model_type", "") or type(config).__name__)


def _layer_types(text: Any, model_type: str, decoder_layers: int) -> list[tuple[str, int | None]]:
    """``(layer type, window)`` per decoder layer, by transformers' own rule."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError as exc:  # pragma: no cover - transformers 5.x has it
        raise UnsupportedError("this transformers has no cache_utils.get_layer_types_and_kwargs; "
                               "kvcore's integration needs transformers 5.x") from exc
    types, kwargs = get_layer_types_and_kwargs(text)
    types = list(types)
    if len(types) != decoder_layers:
        # T5 counts its decoder layers apart (num_decoder_layers) from the
        # num_hidden_layers its config's layer view has; all of them attend in full.
        if set(types) <= {"full_attention"}:
            return [("full_attention", None)] * decoder_layers
        raise UnsupportedError(f"{model_type}: its config describes {len(types)} layer types "
                               f"for {decoder_layers} decoder layers")
    return [(t, kw.get("sliding_window")) for t, kw in zip(types, kwargs)]


def _kv_shape(c: Any, model_type: str) -> tuple[int, int, int]:
    """``(kv heads, K width, V width)`` of what one layer passes to ``cache.update``."""
    heads = getattr(c, "num_attention_heads", None)
    if not heads:
        raise UnsupportedError(f"{model_type}: its config names no attention heads "
                               "(num_attention_heads): kvcore holds attention K/V only")
    if getattr(c, "kv_lora_rank", None):
        if model_type in _LATENT_KV:
            return 1, int(c.kv_lora_rank), int(c.qk_rope_head_dim)
        raise UnsupportedError(
            f"{model_type}: a latent-attention (MLA) config (kv_lora_rank); what its layers "
            "cache differs between model types, and kvcore does not know this one's. Pass "
            "layer_groups= (and num_kv_heads=, head_dim=) to cache_config_for for the "
            "shapes its layers give cache.update")
    if model_type == "falcon":
        # transformers' Falcon: the new architecture broadcasts K/V to every query head
        # before the cache; multi-query keeps one; the oldest layout, every head.
        if getattr(c, "new_decoder_architecture", False):
            kv = heads
        elif getattr(c, "multi_query", False):
            kv = 1
        else:
            kv = getattr(c, "num_kv_heads", None) or heads
    else:
        kv = getattr(c, "num_key_value_heads", None) or heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(kv), int(dim), int(dim)


def model_layout(model_or_config: Any, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, shapes: bool = True) -> ModelLayout:
    """The layer groups ``model_or_config`` needs.  ``num_kv_heads`` / ``head_dim``
    override what every attention layer stores (for models whose layers hand the
    cache other shapes than their config says).  ``shapes=False`` only checks that
    kvcore can hold the model's layers (the caller brings its own groups): the layout
    then has no groups."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = _name(config)
    if model_type in _OWN_CACHE:
        raise UnsupportedError(f"{model_type}: transformers generates with this model's own "
                               "cache, not a Cache object kvcore can stand in for")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
        else config
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    layers = getattr(text, "num_decoder_layers", None) if encoder_decoder else None
    layers = int(layers or getattr(text, "num_hidden_layers", 0) or 0)
    if layers < 1:
        raise UnsupportedError(f"{model_type}: its config names no decoder layers "
                               "(num_hidden_layers)")
    kinds = _layer_types(text, model_type, layers)
    unheld = sorted({t for t, _ in kinds if t not in _KINDS})
    if unheld:
        at = [i for i, (t, _) in enumerate(kinds) if t not in _KINDS]
        what = ("state-space / linear-attention layers, which keep a recurrent state "
                "rather than per-token K/V" if set(unheld) <= _STATE_SPACE else
                "layers kvcore cannot hold (no attention, shared K/V, or an indexer "
                "cache)")
        shown = ", ".join(map(str, at[:8])) + (f", ... ({len(at)} layers)" if len(at) > 8 else "")
        raise UnsupportedError(f"{model_type}: layers {shown} are {unheld}: {what}; kvcore "
                               "holds attention K/V only")
    if not shapes:
        return ModelLayout(model_type, layers, (), encoder_decoder, num_kv_heads or 1,
                           head_dim or 1)
    heterogeneous = bool(getattr(text, "is_heterogeneous", False))
    per_layer = list(text.per_layer_config) if heterogeneous else [text] * layers
    specs: dict[tuple[GroupKind, int | None, int, int, int], list[int]] = {}
    for i, ((kind_name, window), c) in enumerate(zip(kinds, per_layer)):
        kv, k_dim, v_dim = _kv_shape(c, model_type)
        if head_dim:
            k_dim = v_dim = head_dim
        kind = _KINDS[kind_name]
        key = (kind, window if kind is GroupKind.sliding else None, num_kv_heads or kv,
               k_dim, v_dim)
        specs.setdefault(key, []).append(i)
    groups = [LayerGroup(kind=kind, layers=tuple(ids), window=window, num_kv_heads=kv,
                         head_dim=k_dim, v_head_dim=v_dim if v_dim != k_dim else None)
              for (kind, window, kv, k_dim, v_dim), ids in specs.items()]
    first = next(iter(specs))
    if encoder_decoder:
        # Cross-attention reads the encoder's output with the decoder's head shape.
        _, _, kv, k_dim, v_dim = first
        groups.append(LayerGroup(kind=GroupKind.cross, layers=tuple(range(layers, 2 * layers)),
                                 num_kv_heads=kv, head_dim=k_dim,
                                 v_head_dim=v_dim if v_dim != k_dim else None,
                                 encoder_tokens=_encoder_limit(config)))
    return ModelLayout(model_type, layers, tuple(groups), encoder_decoder, first[2], first[3])


def _encoder_limit(config: Any) -> int:
    """The most encoder tokens a row may hold: the model's position limit, where it has
    one (T5's relative positions have none: 4,096 then); rows reserve what they get."""
    for name in ("max_position_embeddings", "n_positions", "max_source_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


#: torch dtypes (by name: this module does not import torch) -> kvcore dtypes.
_TORCH_DTYPES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16",
                 "torch.float32": "float32"}


def cache_config_for(model_or_config: Any, *, num_blocks: int, block_size: int = 16,
                     dtype: Any = None, device: Any = None, **fields: Any) -> CacheConfig:
    """A :class:`~kvcore.CacheConfig` shaped for a transformers model (or its config):
    its decoder layers as layer groups (sliding windows bounded, cross-attention for
    encoder-decoder models; :mod:`kvcore.integrations._model_groups`), their KV heads
    and head size, and (from a model) its dtype and device.

    ``fields`` are further :class:`~kvcore.CacheConfig` fields.  ``num_kv_heads`` and
    ``head_dim`` override what every layer stores (a model whose layers hand the
    cache other shapes than its config says); ``layer_groups`` (with ``num_layers``)
    replaces the groups read from the config.  A model kvcore cannot hold raises
    :class:`~kvcore.errors.UnsupportedError` naming its type."""
    groups = fields.pop("layer_groups", None)
    layout = model_layout(model_or_config, num_kv_heads=fields.pop("num_kv_heads", None),
                          head_dim=fields.pop("head_dim", None), shapes=groups is None)
    num_layers = fields.pop("num_layers", layout.num_layers)
    if groups is None:
        groups = layout.groups
        if len(groups) == 1 and groups[0].kind is GroupKind.full \
                and groups[0].v_head_dim is None:
            groups = ()  # one full group of every layer: the plain config, as before
    model_dtype = _TORCH_DTYPES.get(str(getattr(model_or_config, "dtype", None)), "float32")
    if dtype is None:
        dtype = model_dtype
    elif "compute_dtype" not in fields and DType.parse(dtype).is_codec:
        # A quantized cache is written and read in the model's own dtype unless told.
        fields["compute_dtype"] = model_dtype
    if device is None:
        device = str(getattr(model_or_config, "device", "cpu"))
    return CacheConfig(num_layers=num_layers, num_kv_heads=layout.num_kv_heads,
                       head_dim=layout.head_dim, dtype=dtype, block_size=block_size,
                       num_blocks=num_blocks, device=device, layer_groups=groups, **fields)
