"""Entry point of the ``refbits`` test backend (group ``kvcore``)."""

from __future__ import annotations

import kvcore


@kvcore.hookimpl
def kvcore_backends() -> list[kvcore.BackendSpec]:
    here = __name__.rsplit(".", 1)[0]
    return [
        kvcore.BackendSpec(name="refbits", load=f"{here}.refbits:RefBitsBackend",
                           api_version=2, requires=("numpy",),
                           description="raw-bits pools (test backend)"),
        kvcore.BackendSpec(name="broken-swap", load=f"{here}.broken:LossySwapBackend",
                           api_version=2, requires=("numpy",),
                           description="numpy, but swap loses V (test backend)"),
    ]
