"""kvcore plugin entry point: declares the ``numpy`` backend without importing it."""

from __future__ import annotations

import kvcore


@kvcore.hookimpl
def kvcore_backends() -> list[kvcore.BackendSpec]:
    return [kvcore.BackendSpec(
        name="numpy",
        load="kv_numpy._backend:NumpyBackend",
        api_version=2,
        requires=("numpy",),
        description="NumPy arrays in host memory (cpu; float16, bfloat16, float32; fp8 and int8 codecs)",
        install_hint='pip install "kvcore[numpy]"',
    )]
