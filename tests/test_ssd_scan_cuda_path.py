"""The CUDA path of `sparsify::ssd_scan` (mamba_ssm's Triton chunked SSD kernels), run on CPU.

On CUDA both ops (`ssd_scan`, `ssd_scan_with_state`) call mamba_ssm's
`mamba_chunk_scan_combined` through `_cuda_scan`, mapping their own arguments (dt bias
and softplus, dt limits, D per head or per channel, z, grouped B/C, the initial and
final state) onto mamba_ssm's. Those kernels are Triton, so the
interpreter (TRITON_INTERPRET=1, set in conftest) runs them on CPU once three GPU-only
steps are bypassed: the `torch.cuda.device` context, the SM count query (an H100's 132)
and multi-config autotuning.
Forward and gradients must match the plain-PyTorch recurrence (fp32).
"""
import contextlib
import sys
import types

import pytest
import torch

import sparsify  # noqa: F401  (installs the mamba_ssm hook)
from sparsify.ops import ssd_scan as ssd_scan_module

@pytest.fixture
def chunk_scan(monkeypatch):
    import mamba_ssm.ops.triton.ssd_combined  # noqa: F401  (loads the kernels; the hook records the entry point)
    from triton.runtime.autotuner import Autotuner

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(multi_processor_count=132))
        for module in [m for name, m in sys.modules.items() if name.startswith("mamba_ssm.ops.triton")]:
            for kernel in vars(module).values():
                if isinstance(kernel, Autotuner):  # the interpreter cannot benchmark configs: keep the first
                    monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
    assert ssd_scan_module.cuda_chunk_scan is not None
    return ssd_scan_module._cuda_scan


def scan_inputs(g, b, length, heads, headdim, groups, state, d_per_channel, with_z):
    """x, dt, A, B, C, D, z (or None), dt_bias: random, on the device, requiring grad."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device).requires_grad_()

    return [rand(b, length, heads, headdim), rand(b, length, heads, scale=0.5),
            (-torch.rand(heads, generator=g) - 0.1).to(device).requires_grad_(),
            rand(b, length, groups, state), rand(b, length, groups, state),
            rand(heads, headdim) if d_per_channel else rand(heads),
            rand(b, length, heads, headdim) if with_z else None, rand(heads, scale=0.5)]


@pytest.mark.parametrize("groups,d_per_channel,with_z,dt_limit", [
    (1, False, True, (0.0, float("inf"))),
    (2, True, False, (0.05, 2.0)),
])
def test_cuda_path_matches_the_recurrence(chunk_scan, groups, d_per_channel, with_z, dt_limit):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    inputs = scan_inputs(g, 2, 37, 4, 8, groups, 16, d_per_channel, with_z)
    options = (True, *dt_limit)
    got = chunk_scan(*inputs, *options)
    want = ssd_scan_module.ssd_scan_ref(*inputs, *options)
    upstream = torch.randn(want.shape, generator=g).to(device)
    tensors = [t for t in inputs if t is not None]
    grads_got = torch.autograd.grad(got, tensors, upstream)
    grads_want = torch.autograd.grad(want, tensors, upstream)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, a, e in zip(["x", "dt", "A", "B", "C", "D", "z", "dt_bias"], grads_got, grads_want):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3, msg=f"grad of {name}")


def test_cuda_path_with_a_state_in_and_out_matches_the_recurrence(chunk_scan):
    """`sparsify::ssd_scan_with_state` on CUDA (a generation prefill): mamba_ssm's kernels from a given state,
    returning the final one; output, final state and every gradient (the initial state's too) equal the
    recurrence's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    b, length, heads, headdim, state = 2, 21, 4, 8, 16
    initial_state = torch.randn(b, heads, headdim, state, generator=g).to(device).requires_grad_()
    inputs = scan_inputs(g, b, length, heads, headdim, 1, state, False, False) + [initial_state]
    options = (True, 0.0, float("inf"))
    got = chunk_scan(*inputs[:8], *options, inputs[8], True)  # the initial state, and the final one wanted
    want = ssd_scan_module.ssd_scan_ref(*inputs[:8], *options, inputs[8], True)
    assert got[1].dtype == torch.float32
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    upstream = [torch.randn(t.shape, generator=g).to(device) for t in want]
    tensors = [t for t in inputs if t is not None]
    for name, a, e in zip(["x", "dt", "A", "B", "C", "D", "dt_bias", "initial state"],
                          torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3, msg=f"grad of {name}")
