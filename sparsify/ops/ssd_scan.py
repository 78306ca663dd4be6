"""`sparsify::ssd_scan`: the Mamba2 (SSD) scan as one opaque op, per head with a scalar decay.

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        (h: [headdim, dstate] per head)
    y_t = h_t C_t + D * x_t,   out = y * silu(z)
with dt = clamp(softplus(dt + dt_bias)) as mamba_ssm's mamba_chunk_scan_combined.
Shapes: x, z [b, l, h, p]; dt [b, l, h]; A [h]; B, C [b, l, g, n]; D [h] or [h, p];
dt_bias [h]. On CPU it is SSD's chunked algorithm in PyTorch (`ssd_scan_cpu`):
within chunks of CPU_CHUNK steps a masked [Q, Q] product per head, across chunks a
short recurrence over the chunk states; this op's backward recomputes it under
autograd. CUDA runs mamba_ssm's chunked Triton kernels when mamba_ssm is installed.
`sparsify::ssd_scan_with_state` also takes an initial state and returns the final one
([b, h, p, n], fp32): the prefill of generation with a cache. `ssd_scan_ref` is the
step-by-step reference both are tested against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._recompute import save_optional_tensors, vjp_by_recompute

# mamba_ssm's Triton mamba_chunk_scan_combined, set by sparsify.frontends.mamba_ssm when mamba_ssm loads.
cuda_chunk_scan = None


def _step_sizes(dt, dt_bias, dt_softplus, dt_min, dt_max):
    """dt = clamp(softplus(dt + dt_bias)) in fp32, as mamba_chunk_scan_combined takes its options."""
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_min > 0.0 or dt_max != float("inf"):
        dt = dt.clamp(min=dt_min, max=dt_max)
    return dt


def _per_head(t, heads):
    """[b, l, g, n] fp32 -> [b, l, heads, n]: each group's B or C for each of its heads."""
    return t.float().repeat_interleave(heads // t.shape[2], dim=2)


def _skip_and_gate(y, x, D, z):
    """y + D * x, then times silu(z), in fp32, back in x's dtype."""
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_min=0.0,
                 dt_max=float("inf"), initial_state=None, return_final_state=False):
    x_in, x = x, x.float()
    dt = _step_sizes(dt, dt_bias, dt_softplus, dt_min, dt_max)
    heads = x.shape[2]
    B, C = _per_head(B, heads), _per_head(C, heads)
    decay = torch.exp(dt * A.float())                             # [b, l, h]
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[-1]) if initial_state is None \
        else initial_state.float()
    outputs = []
    for t in range(x.shape[1]):
        drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]   # [b, h, p, n]
        state = decay[:, t, :, None, None] * state + drive
        outputs.append((state * C[:, t, :, None, :]).sum(-1))
    y = _skip_and_gate(torch.stack(outputs, dim=1) if outputs else x.new_zeros(x.shape), x_in, D, z)
    return (y, state) if return_final_state else y


# Chunk length of the CPU scan. Within a chunk the scan is a masked [Q, Q] product per head, across chunks a
# recurrence over L / Q states: SSD's chunked algorithm, its work in batched matmuls. A selective scan per
# (head, headdim) channel, as this op was before, does it as elementwise updates of [b, h * p, n] states
# (measured on an HF Mamba2 4 x 256 training step: 4.4 s that way, 0.51 s chunked).
CPU_CHUNK = 64


def _segment_sums(log_decay: Tensor) -> Tensor:
    """[..., Q] -> [..., Q, Q]: entry (t, s) = sum of log_decay over (s, t] for s <= t, -inf above the
    diagonal. Cumulative sums of masked copies rather than differences of one cumulative sum: a difference of
    two long sums loses the digits of a short one (the chunk-end terms below are differences, but of sums over
    one chunk at most)."""
    q = log_decay.shape[-1]
    repeated = log_decay[..., None, :].expand(*log_decay.shape[:-1], q, q)   # [..., t, k] = a_k
    lower = torch.ones(q, q, dtype=torch.bool, device=log_decay.device).tril()
    sums = repeated.transpose(-1, -2).masked_fill(~lower.tril(-1), 0).cumsum(-2)  # [..., t, s] = sum_{s<k<=t}
    return sums.masked_fill(~lower, float("-inf"))


def ssd_scan_cpu(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_min=0.0, dt_max=float("inf"),
                 initial_state=None, return_final_state=False):
    """The SSD scan by chunks (differentiable PyTorch; the ops' backward recomputes it under autograd), from
    `initial_state` [b, h, p, n] (zeros when None); with the final state too where asked for."""
    b, length, heads, headdim = x.shape
    if length == 0:  # nothing to scan (x * 0, not zeros_like: the backward's recompute needs a graph)
        if not return_final_state:
            return x * 0
        if initial_state is None:
            return x * 0, x.new_zeros(b, heads, headdim, B.shape[-1], dtype=torch.float32)
        return x * 0, initial_state.float() * 1  # a new tensor: an op's output may not alias its input
    dt = _step_sizes(dt, dt_bias, dt_softplus, dt_min, dt_max)
    q = min(CPU_CHUNK, length)
    pad = (-length) % q
    chunks = (length + pad) // q

    def chunked(t):  # [b, l, ...] -> [b, chunks, q, ...], zero-padded at the end: a padded step has dt 0,
        # so it neither decays the state nor adds to it, and its outputs are cut off
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, chunks, q, *t.shape[2:])

    xdt, Bc, Cc = chunked(x.float() * dt[..., None]), chunked(_per_head(B, heads)), chunked(_per_head(C, heads))
    # [b, c, q, h, p|n]
    log_decay = chunked(dt * A.float()).permute(0, 1, 3, 2)                   # [b, c, h, q]
    cumulative = log_decay.cumsum(-1)
    # within chunks: y_t += sum_{s<=t} exp(sum_(s,t] log_decay) (C_t . B_s) dt_s x_s
    within = torch.exp(_segment_sums(log_decay)) * torch.einsum("bcthn,bcshn->bchts", Cc, Bc)
    y = torch.einsum("bchts,bcshp->bcthp", within, xdt)
    # each chunk's own contribution to the state at its end, then the states entering each chunk
    to_end = torch.exp(cumulative[..., -1:] - cumulative)                     # [b, c, h, q]
    chunk_states = torch.einsum("bchs,bcshn,bcshp->bchpn", to_end, Bc, xdt)
    from_start = torch.exp(cumulative)                                        # [b, c, h, q]
    chunk_decay = from_start[..., -1]                                         # [b, c, h]: over the whole chunk
    state = xdt.new_zeros(b, heads, headdim, B.shape[-1]) if initial_state is None else initial_state.float()
    entering = []
    # unbound once: indexing chunk c in the loop would cost its backward a zero-filled copy of the whole
    # tensor per chunk (SelectBackward), quadratic in the chunks (at length 4096 most of the step)
    for decay, own in zip(chunk_decay[..., None, None].unbind(1), chunk_states.unbind(1)):
        entering.append(state)
        state = decay * state + own
    entering = torch.stack(entering, 1)                                       # [b, c, h, p, n]
    # from the state entering the chunk: y_t += exp(sum_[0,t] log_decay) C_t . state
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, entering) * from_start.transpose(-1, -2)[..., None]
    # contiguous, as the fake's empty_like(x) says: callers view the output (Falcon-H1's mixer does)
    y = _skip_and_gate(y.reshape(b, chunks * q, heads, headdim)[:, :length].contiguous(), x, D, z)
    # the padded steps have dt 0: the state after them is the state after the last real step
    return (y, state) if return_final_state else y


@torch.library.custom_op("sparsify::ssd_scan", mutates_args=())
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float,
             dt_max: float) -> Tensor:
    # no defaults: a schema cannot spell an infinite default, and the caller always knows dt_limit
    return _scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max)


@torch.library.custom_op("sparsify::ssd_scan_with_state", mutates_args=())
def ssd_scan_with_state(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
                        dt_softplus: bool, dt_min: float, dt_max: float) -> tuple[Tensor, Tensor]:
    return _scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, True)


def _scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state=None, return_final_state=False):
    """Both ops' implementation: mamba_ssm's kernels on CUDA where they are installed, else the chunked scan."""
    scan = _cuda_scan if x.is_cuda and cuda_chunk_scan is not None else ssd_scan_cpu
    return scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, return_final_state)


def _cuda_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state=None,
               return_final_state=False):
    # The chunk size only changes the order of the sums; 256 is mamba_ssm's default.
    out = cuda_chunk_scan(x, dt, A, B, C, 256, D=D, z=z, dt_bias=dt_bias, initial_states=initial_state,
                          dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max), return_final_states=return_final_state)
    return (out[0], out[1].float()) if return_final_state else out


def ssd_scan_fn(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                initial_states=None, return_final_states=False):
    """mamba_ssm's mamba_chunk_scan_combined options (packed sequences aside) over the ops: what mamba_ssm's
    and transformers' Mamba2 code call, through sparsify.frontends. With a state in or out, the op that takes
    and returns one (a generation prefill)."""
    limits = float(dt_limit[0]), float(dt_limit[1])
    if initial_states is None and not return_final_states:
        return torch.ops.sparsify.ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, *limits)
    y, final_state = torch.ops.sparsify.ssd_scan_with_state(x, dt, A, B, C, D, z, dt_bias, initial_states,
                                                            dt_softplus, *limits)
    return (y, final_state) if return_final_states else y


@ssd_scan.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


@ssd_scan_with_state.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    # both ops: the tensors (the with-state op's ninth is the initial state), then dt_softplus, dt_min, dt_max
    save_optional_tensors(ctx, inputs[:-3])
    ctx.options = inputs[-3:]


def _backward(ctx, *grads):
    """The scan recomputed under autograd. For the with-state op, grads are the output's and the final state's
    (autograd hands zeros for a final state no loss used: one that only filled a cache)."""
    with_state = len(ctx.saved_tensors) == 9

    def forward(*tensors):
        initial_state = tensors[8] if with_state else None
        return _scan(*tensors[:8], *ctx.options, initial_state, with_state)

    return vjp_by_recompute(forward, ctx.saved_tensors, grads) + (None,) * 3


ssd_scan.register_autograd(_backward, setup_context=_setup_context)
ssd_scan_with_state.register_autograd(_backward, setup_context=_setup_context)
