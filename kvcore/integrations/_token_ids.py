"""Token ids for the caches a model runs with: a kvcore cache's ``update`` sees K/V,
never ids, so a forward pre-hook hands them over (:func:`track_token_ids`)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["track_token_ids"]

_TRACKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def track_token_ids(model: torch.nn.Module) -> None:
    """Let the kvcore caches ``model`` runs with learn the token ids of each forward
    pass (idempotent; :meth:`KvCoreCache.from_model` calls it).

    A cache's ``update`` sees K/V, never ids.  With this, a forward pre-hook hands a
    :class:`KvCoreCache` (or a :class:`KvCoreEncoderDecoderCache`'s self-attention
    part) the pass's ``input_ids`` (``decoder_input_ids``), and a decode step extends
    its rows with them: the blocks generated tokens fill join the prefix cache like
    prompt blocks, so the next turn of a chat, whose prompt repeats this turn's reply,
    finds them.  Only rows allocated with their prompt ids (``set_prompts``) keep a
    chain; a pass fed embeddings has no ids and ends it.  A forward hook (run even
    when the forward raises) drops the ids after the pass, so they never reach
    another pass."""
    if model in _TRACKED:
        return
    model.register_forward_pre_hook(_see_ids, with_kwargs=True)
    model.register_forward_hook(_forget_ids, with_kwargs=True, always_call=True)
    _TRACKED.add(model)


def _takes_ids(cache: Any) -> bool:
    # A KvCoreCache, told apart by the slot it keeps the ids in (this module is
    # imported by the cache's, so it names the class instead of importing it).
    return "_next_ids" in getattr(cache, "__dict__", ())


def _cache_and_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    inner = getattr(cache, "self_attention_cache", None)  # KvCoreEncoderDecoderCache
    if inner is not None and _takes_ids(inner):
        return inner, kwargs.get("decoder_input_ids")
    if _takes_ids(cache):
        return cache, kwargs.get("input_ids", args[0] if args else None)
    return None, None


def _see_ids(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cache, ids = _cache_and_ids(args, kwargs)
    if cache is not None:
        cache._next_ids = ids if isinstance(ids, torch.Tensor) else None


def _forget_ids(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any) -> None:
    cache, _ = _cache_and_ids(args, kwargs)
    if cache is not None:
        cache._next_ids = None
