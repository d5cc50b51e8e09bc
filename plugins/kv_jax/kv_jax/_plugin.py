"""kvcore plugin entry point: declares the ``jax`` backend without importing jax."""

from __future__ import annotations

import kvcore


@kvcore.hookimpl
def kvcore_backends() -> list[kvcore.BackendSpec]:
    return [kvcore.BackendSpec(
        name="jax",
        load="kv_jax._backend:JaxBackend",
        api_version=2,
        # jax arrays are jaxlib.ArrayImpl objects: naming jaxlib lets kvcore.attention
        # find this backend from a bare pool (kvcore.backend_for_array).
        requires=("jax", "jaxlib"),
        description="JAX arrays on the CPU, immutable, jit with buffer donation "
                    "(cpu; float16, bfloat16, float32)",
        install_hint='pip install "kvcore[jax]"',
        extra={"devices": "cpu", "dtypes": "float16, bfloat16, float32",
               "swap": "cpu", "pools": "immutable (each write returns the new pool)"},
    )]
