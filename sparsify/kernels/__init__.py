"""Triton kernels for the routed ops, one file per op (same base name as sparsify/ops/).

Each file has private @triton.jit kernels and launchers that check shapes and
strides; the torch reference of the same op lives in sparsify/ops/. Importing
this package needs triton; sparsify.ops imports it lazily, only when the Triton
backend is used.
"""
import os

import triton

# Under TRITON_INTERPRET=1 kernels run on CPU through numpy: autotuning over several
# configs needs a GPU, so one config is used there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu_configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    return [interpret_config] if INTERPRET else gpu_configs
