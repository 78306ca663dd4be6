"""`sparsify::selective_scan`: the Mamba selective scan as one opaque op.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (per channel d, state n)
    y_t = <h_t, C_t> + D * u_t,   out = y * silu(z)
with delta = softplus(delta + delta_bias) when delta_softplus. Shapes as mamba_ssm's
selective_scan_fn: u, delta, z [b, d, l]; A [d, n] (real); B, C [b, n, l] or
[b, groups, n, l]; D, delta_bias [d].

Being one op keeps the capture dynamic in the sequence length (the reference
loops over time) and lets the route pass see the scan's operands. CPU runs the
plain-PyTorch reference; CUDA runs mamba_ssm's kernel when its extension is
installed. Backward recomputes the forward under autograd (mamba_ssm's kernel and
its CUDA backward where available, the reference elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._recompute import save_optional_tensors, vjp_by_recompute
from sparsify.errors import SparsifyError

# mamba_ssm's own CUDA selective scan, set by sparsify.frontends.mamba_ssm when the extension exists.
cuda_selective_scan = None


def _per_channel(x: Tensor, channels: int) -> Tensor:
    """B or C as [b, d, n, l]: [b, n, l] is shared by all channels, [b, g, n, l] by channel groups."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.repeat_interleave(channels // x.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    if A.is_complex():
        raise SparsifyError("selective_scan: complex A is not supported by sparsify's reference")
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels = u.shape[1]
    B, C = _per_channel(B.float(), channels), _per_channel(C.float(), channels)
    decay = torch.exp(delta.unsqueeze(2) * A.float()[None, :, :, None])  # [b, d, n, l]
    drive = (delta * u).unsqueeze(2) * B                                  # [b, d, n, l]
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        state = decay[..., t] * state + drive[..., t]
        outputs.append((state * C[..., t]).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_last_state else y


@torch.library.custom_op("sparsify::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False) -> Tensor:
    if u.is_cuda and cuda_selective_scan is not None:
        return cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    save_optional_tensors(ctx, inputs[:8])
    ctx.delta_softplus = inputs[8]


def _backward(ctx, grad):
    # Recompute through mamba_ssm's kernel (and its CUDA backward) when it is there.
    def forward(*tensors):
        if tensors[0].is_cuda and cuda_selective_scan is not None:
            return cuda_selective_scan(*tensors, ctx.delta_softplus)
        return selective_scan_ref(*tensors, delta_softplus=ctx.delta_softplus)

    return vjp_by_recompute(forward, ctx.saved_tensors, grad) + (None,)


selective_scan.register_autograd(_backward, setup_context=_setup_context)
