"""Which implementation a routed op runs: the torch reference or the Triton kernel."""
from __future__ import annotations

import importlib.util
import os

from sparsify.errors import SparsifyError

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, device) -> bool:
    """'auto': Triton on CUDA when triton is installed, the torch reference elsewhere. 'triton' forces the
    kernels (on CPU they then need TRITON_INTERPRET=1, set before triton is imported)."""
    if backend not in BACKENDS:
        raise SparsifyError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise SparsifyError("backend='triton' needs the triton package: pip install triton")
        if getattr(device, "type", device) != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SparsifyError("backend='triton' on a CPU model needs Triton's interpreter: set TRITON_INTERPRET=1 "
                                "before triton is imported, or use backend='torch' (or move the model to a GPU)")
        return True
    return getattr(device, "type", device) == "cuda" and triton_available()
