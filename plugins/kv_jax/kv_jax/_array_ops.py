"""The array operations kvcore's generic code (paged attention) runs on JAX arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvcore._array_ops import NamespaceOps

__all__ = ["JaxOps"]


class JaxOps(NamespaceOps):
    """:class:`kvcore._array_ops.NamespaceOps` over ``jax.numpy``, with host data put
    on the device of the array it will meet (JAX's default device may differ)."""

    mutable = False  # jax arrays are immutable: padding is zeroed with where()

    def __init__(self) -> None:
        super().__init__(jnp, "jax")

    @property
    def array_modules(self) -> tuple[str, ...]:
        return ("jax", "jaxlib")  # jax.Array's concrete type is jaxlib's ArrayImpl

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        # A private copy: device_put may alias host memory, and the caller's array
        # may change after this returns.
        return jax.device_put(np.array(host, copy=True), next(iter(like.sharding.device_set)))

    def device_key(self, a: Any) -> str:
        return str(next(iter(a.sharding.device_set)))
