"""kvcore plugin entry point: declares the ``torch`` backend without importing torch."""

from __future__ import annotations

import kvcore


@kvcore.hookimpl
def kvcore_backends() -> list[kvcore.BackendSpec]:
    return [kvcore.BackendSpec(
        name="torch",
        load="kv_torch._backend:TorchBackend",
        api_version=2,
        requires=("torch",),
        description="PyTorch tensors (cpu, cuda:N; float16, bfloat16, float32)",
        install_hint='pip install "kvcore[torch]"',
        extra={"devices": "cpu, cuda:N", "dtypes": "float16, bfloat16, float32",
               "swap": "cpu (pinned when the pool is on cuda), cuda"},
    )]
