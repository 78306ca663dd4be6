"""`sparsify::selective_scan`: the Mamba selective scan as one opaque op.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (per channel d, state n)
    y_t = <h_t, C_t> + D * u_t,   out = y * silu(z)
with delta = softplus(delta + delta_bias) when delta_softplus. Shapes as mamba_ssm's
selective_scan_fn: u, delta, z [b, d, l]; A [d, n] (real); B, C [b, n, l] or
[b, groups, n, l]; D, delta_bias [d].

Being one op keeps the capture dynamic in the sequence length and lets the route
pass see the scan's operands. CPU runs `selective_scan_cpu` (the two-level scan of
_linear_scan.py, ~2 sqrt(L) Python steps) and its analytic backward (the adjoint
recurrence, run by the same scan backwards in time; states recomputed, not saved).
CUDA runs mamba_ssm's kernel when its extension is installed, and its backward
recomputes that kernel's forward under autograd. `selective_scan_ref` is the
step-by-step reference both are tested against. `sparsify::selective_scan_with_state`
also returns the final state (the prefill of generation with a cache).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.errors import SparsifyError
from sparsify.ops._linear_scan import linear_scan
from sparsify.ops._recompute import save_optional_tensors, vjp_by_recompute

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


class _TimeMajor:
    """The scan's operands in fp32, time first ([l, b, d, n] for per-state tensors), as both directions use
    them. B and C shared by all channels stay [l, b, n] (multiplied in by batched matmuls); grouped ones are
    spread to [l, b, d, n]."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        if A.is_complex():
            raise SparsifyError("selective_scan: complex A is not supported by sparsify's CPU scan")
        self.channels, self.groups = u.shape[1], (B.shape[1] if B.dim() == 4 else None)
        self.pre = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
        dt = F.softplus(self.pre) if delta_softplus else self.pre
        self.u, self.dt, self.A = u.float().permute(2, 0, 1), dt.permute(2, 0, 1), A.float()  # [l, b, d]
        self.B, self.C = self._time_major(B), self._time_major(C)
        self.decay = torch.exp(self.dt[..., None] * self.A)  # [l, b, d, n]
        self.dtu = self.dt * self.u

    def _time_major(self, x):
        if x.dim() == 3:
            return x.float().permute(2, 0, 1)  # [l, b, n]
        return x.float().permute(3, 0, 1, 2).repeat_interleave(self.channels // x.shape[1], dim=2)  # [l, b, d, n]

    def times_state(self, values, per_state):
        """values [l, b, d] times B or C per state: [l, b, d, n]."""
        per_state = per_state if per_state.dim() == 4 else per_state[:, :, None, :]
        return values[..., None] * per_state

    def contract(self, states, per_state):
        """sum over n of states [l, b, d, n] times B or C: [l, b, d]."""
        if per_state.dim() == 3:
            return torch.matmul(states, per_state[..., None]).squeeze(-1)
        return (states * per_state).sum(-1)

    def ungated_output(self, states, C, u, D):
        """y before the z gate, [b, d, l] fp32: the states read out through C, plus D * u."""
        y = self.contract(states, C).permute(1, 2, 0)
        return y + u.float() * D.float()[:, None] if D is not None else y

    def per_state_grad(self, values, states, like):
        """Gradient of a B or C operand: sum over channels of values [l, b, d] times states, in its layout."""
        if like.dim() == 3:
            return torch.matmul(values[:, :, None, :], states).squeeze(2).permute(1, 2, 0)  # [b, n, l]
        full = values[..., None] * states  # [l, b, d, n]
        grouped = full.reshape(*full.shape[:2], self.groups, -1, full.shape[-1]).sum(3)  # [l, b, g, n]
        return grouped.permute(1, 2, 3, 0)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The scan without a Python step per token (see _linear_scan.py); the same numbers as the reference up
    to float rounding. With return_last_state, also the state after the last step ([b, d, n], fp32). Plain
    PyTorch: the CPU path, and the path on any device mamba_ssm's kernels do not serve."""
    ops = _TimeMajor(u, delta, A, B, C, delta_bias, delta_softplus)
    states = linear_scan(ops.decay, ops.times_state(ops.dtu, ops.B))
    y = ops.ungated_output(states, ops.C, u, D)
    if z is not None:
        y = y * F.silu(z.float())
    if not return_last_state:
        return y.to(u.dtype)
    last = states[-1] if states.shape[0] else u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    return y.to(u.dtype), last.contiguous()


def selective_scan_cpu_backward(grad, u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_last_state=None):
    """Gradients of selective_scan_cpu for (u, delta, A, B, C, D, z, delta_bias), None where absent.

    With G_t = dL/dh_t, the adjoint runs backwards in time: G_t = C_t g_t + a_{t+1} G_{t+1} (plus the last
    state's gradient at the last step); then dL/dx_t = G_t and dL/da_t = G_t h_{t-1}, which the chain rule
    takes to every operand."""
    ops = _TimeMajor(u, delta, A, B, C, delta_bias, delta_softplus)
    states = linear_scan(ops.decay, ops.times_state(ops.dtu, ops.B))
    g = grad.float()
    grads = dict.fromkeys(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    if z is not None:
        scan_y = ops.ungated_output(states, ops.C, u, D)
        sig = torch.sigmoid(z.float())
        grads["z"] = (g * scan_y * sig * (1 + z.float() * (1 - sig))).to(z.dtype)
        g = g * z.float() * sig  # through the gate: silu(z) = z * sigmoid(z)
    grad_u = g * D.float()[:, None] if D is not None else torch.zeros_like(g)
    if D is not None:
        grads["D"] = (g * u.float()).sum((0, 2)).to(D.dtype)
    g = g.permute(2, 0, 1)  # [l, b, d]
    grads["C"] = ops.per_state_grad(g, states, C).to(C.dtype)
    next_decay = torch.cat([ops.decay[1:], torch.zeros_like(ops.decay[:1])])
    from_outputs = ops.times_state(g, ops.C)
    if grad_last_state is not None and from_outputs.shape[0]:
        from_outputs[-1] += grad_last_state.float()
    adjoint = linear_scan(next_decay.flip(0), from_outputs.flip(0)).flip(0)  # G_t
    previous = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
    grad_log_decay = adjoint * previous * ops.decay  # dL/d(dt * A), [l, b, d, n]
    del previous, states
    grads["A"] = (grad_log_decay * ops.dt[..., None]).sum((0, 1)).to(A.dtype)
    grads["B"] = ops.per_state_grad(ops.dtu, adjoint, B).to(B.dtype)
    adjoint_b = ops.contract(adjoint, ops.B)  # sum_n G B: [l, b, d]
    grad_dt = (grad_log_decay * ops.A).sum(-1) + adjoint_b * ops.u
    grads["u"] = (grad_u + (adjoint_b * ops.dt).permute(1, 2, 0)).to(u.dtype)
    grad_pre = grad_dt.permute(1, 2, 0)
    if delta_softplus:
        grad_pre = grad_pre * torch.sigmoid(ops.pre)
    grads["delta"] = grad_pre.to(delta.dtype)
    if delta_bias is not None:
        grads["delta_bias"] = grad_pre.sum((0, 2)).to(delta_bias.dtype)
    return tuple(grads.values())


@torch.library.custom_op("sparsify::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False) -> Tensor:
    if u.is_cuda and cuda_selective_scan is not None:
        return cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    save_optional_tensors(ctx, inputs[:8])
    ctx.delta_softplus = inputs[8]


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    if saved[0].is_cuda and cuda_selective_scan is not None:
        # Recompute through mamba_ssm's kernel (and its CUDA backward).
        return vjp_by_recompute(lambda *t: cuda_selective_scan(*t, ctx.delta_softplus), saved, grad) + (None,)
    return selective_scan_cpu_backward(grad, *saved, ctx.delta_softplus) + (None,)


selective_scan.register_autograd(_backward, setup_context=_setup_context)


# The scan that also returns its final state ([b, d, n], fp32): the prefill of generation with a cache.
# On CUDA mamba_ssm's kernel when its extension is installed (set by sparsify.frontends.mamba_ssm).
cuda_selective_scan_with_state = None


@torch.library.custom_op("sparsify::selective_scan_with_state", mutates_args=())
def selective_scan_with_state(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                              delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    if u.is_cuda and cuda_selective_scan_with_state is not None:
        y, last = cuda_selective_scan_with_state(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return y, last.float()
    return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)


@selective_scan_with_state.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)


def _backward_with_state(ctx, grad, grad_last_state):
    # Autograd hands a zero gradient for a final state no loss used (it fed a cache): then on CUDA this is the
    # scan's own backward through mamba_ssm's kernel. Elsewhere the analytic backward takes both gradients.
    if grad.is_cuda and cuda_selective_scan is not None and not bool(grad_last_state.any()):
        return _backward(ctx, grad)
    return selective_scan_cpu_backward(grad, *ctx.saved_tensors, ctx.delta_softplus,
                                       grad_last_state=grad_last_state) + (None,)


selective_scan_with_state.register_autograd(_backward_with_state, setup_context=_setup_context)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm's selective_scan_fn signature over the sparsify ops, with the final state where it is wanted
    (the prefill of generation with a cache): what mamba_ssm's and transformers' Mamba code call, through
    sparsify.frontends."""
    if return_last_state:
        return torch.ops.sparsify.selective_scan_with_state(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return torch.ops.sparsify.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
