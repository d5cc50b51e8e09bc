"""kvcore plugin entry point: declares the ``cupy`` backend without importing cupy."""

from __future__ import annotations

import kvcore

#: What to run when cupy is missing.  The extra must match the machine's CUDA major
#: version, which cannot be learnt here without importing a CUDA library; each brings
#: CuPy with the CUDA toolkit wheels it compiles its kernels with.
INSTALL_HINT = ('pip install "kvcore-cupy[cuda12]" (or [cuda13], matching the '
                "machine's CUDA version)")


@kvcore.hookimpl
def kvcore_backends() -> list[kvcore.BackendSpec]:
    return [kvcore.BackendSpec(
        name="cupy",
        load="kv_cupy._backend:CupyBackend",
        api_version=2,
        requires=("cupy",),
        description="CuPy arrays in CUDA device memory (cuda:N; float16, float32)",
        install_hint=INSTALL_HINT,
        extra={"devices": "cuda:N", "dtypes": "float16, float32",
               "swap": "cpu (pinned), cuda"},
    )]
