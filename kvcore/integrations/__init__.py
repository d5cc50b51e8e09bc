"""Bridges between kvcore and inference libraries.

Each integration lives in its own submodule and imports its library only when that
submodule is imported, so ``import kvcore`` (and ``import kvcore.integrations``) never
pulls in torch or transformers:

* :mod:`kvcore.integrations.transformers`: :class:`KvCoreCache`, a Hugging Face
  ``Cache`` whose K/V live in a :class:`~kvcore.KvCacheManager`, so ``generate()``
  (greedy, sampling, beam search) runs on kvcore's paged pool with prefix caching and
  copy-on-write forks.
"""

from __future__ import annotations

__all__: list[str] = []
