"""`sparsify::ssd_scan`: the Mamba2 (SSD) scan as one opaque op, per head with a scalar decay.

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        (h: [headdim, dstate] per head)
    y_t = h_t C_t + D * x_t,   out = y * silu(z)
with dt = clamp(softplus(dt + dt_bias)) as mamba_ssm's mamba_chunk_scan_combined.
Shapes: x, z [b, l, h, p]; dt [b, l, h]; A [h]; B, C [b, l, g, n]; D [h] or [h, p];
dt_bias [h]. On CPU it is a selective scan whose channels are (head, headdim) pairs,
each with its head's decay (`ssd_scan_cpu`): sparsify::selective_scan's chunked scan
and analytic backward, which autograd reaches through the reshapes when this op's
backward recomputes its forward. CUDA runs mamba_ssm's chunked Triton kernels when
mamba_ssm is installed. `ssd_scan_ref` is the step-by-step reference (and what a
caller wanting the final state runs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._recompute import save_optional_tensors, vjp_by_recompute

# mamba_ssm's Triton mamba_chunk_scan_combined, set by sparsify.frontends.mamba_ssm when mamba_ssm loads.
cuda_chunk_scan = None


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_min=0.0,
                 dt_max=float("inf"), initial_state=None, return_final_state=False):
    dtype = x.dtype
    x, dt = x.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_min > 0.0 or dt_max != float("inf"):
        dt = dt.clamp(min=dt_min, max=dt_max)
    heads = x.shape[2]
    B = B.float().repeat_interleave(heads // B.shape[2], dim=2)  # groups -> heads
    C = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    decay = torch.exp(dt * A.float())                             # [b, l, h]
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[-1]) if initial_state is None \
        else initial_state.float()
    outputs = []
    for t in range(x.shape[1]):
        drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]   # [b, h, p, n]
        state = decay[:, t, :, None, None] * state + drive
        outputs.append((state * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1) if outputs else x.new_zeros(x.shape)
    if D is not None:
        y = y + x * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_final_state else y


def ssd_scan_cpu(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_min=0.0, dt_max=float("inf")):
    """The SSD scan as a selective scan over d = heads * headdim channels (differentiable)."""
    b, length, heads, headdim = x.shape
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_min > 0.0 or dt_max != float("inf"):
        dt = dt.clamp(min=dt_min, max=dt_max)

    def channels_first(t):  # [b, l, h, p] -> [b, h * p, l]
        return t.permute(0, 2, 3, 1).reshape(b, heads * headdim, length)

    def states(t):  # [b, l, g, n] -> [b, n, l] shared by all channels, or [b, g, n, l] per group of heads
        return t[:, :, 0].permute(0, 2, 1) if t.shape[2] == 1 else t.permute(0, 2, 3, 1)

    delta = dt.permute(0, 2, 1)[:, :, None, :].expand(b, heads, headdim, length).reshape(b, heads * headdim, length)
    A_full = A.float()[:, None, None].expand(heads, headdim, B.shape[-1]).reshape(heads * headdim, B.shape[-1])
    D_full = None if D is None else (D[:, None].expand(heads, headdim) if D.dim() == 1 else D).reshape(-1)
    y = torch.ops.sparsify.selective_scan(channels_first(x), delta, A_full, states(B), states(C), D_full,
                                          None if z is None else channels_first(z), None, False)
    return y.reshape(b, heads, headdim, length).permute(0, 3, 1, 2).to(x.dtype)


@torch.library.custom_op("sparsify::ssd_scan", mutates_args=())
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float,
             dt_max: float) -> Tensor:
    # no defaults: a schema cannot spell an infinite default, and the caller always knows dt_limit
    if x.is_cuda and cuda_chunk_scan is not None:
        return _cuda_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max)
    return ssd_scan_cpu(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max)


def _cuda_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    # The chunk size only changes the order of the sums; 256 is mamba_ssm's default.
    return cuda_chunk_scan(x, dt, A, B, C, 256, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                           dt_limit=(dt_min, dt_max))


@ssd_scan.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    save_optional_tensors(ctx, inputs[:8])
    ctx.options = inputs[8:]


def _backward(ctx, grad):
    def forward(*tensors):
        scan = _cuda_scan if tensors[0].is_cuda and cuda_chunk_scan is not None else ssd_scan_cpu
        return scan(*tensors, *ctx.options)

    return vjp_by_recompute(forward, ctx.saved_tensors, grad) + (None,) * 3


ssd_scan.register_autograd(_backward, setup_context=_setup_context)
