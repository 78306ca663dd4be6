"""`sparsify::routed_rms_norm`: RMS norm over the last dim with the scale of each token's modality.

y = weight[ids] * (x * rsqrt(mean(x^2) + eps)), statistics in fp32 (as Llama's RMSNorm).
x is [..., D], modality_ids x.shape[:-1], weight [M, D]. The Triton kernel is the
shared norm kernel in sparsify/kernels/routed_layer_norm.py (IS_RMS=True).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of
from sparsify.ops.backend import use_triton


def routed_rms_norm_ref(x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    x_acc = x.to(acc)
    normed = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    out_dtype = torch.result_type(x, weight)
    # The per-token scale as one broadcast multiply: weight rows gathered per token (a [tokens, D] gather is
    # cheaper than grouping rows for an elementwise op), or the one modality's row when all tokens share it.
    groups = groups_of(modality_ids, weight.shape[0])
    if groups.single is not None:
        scale = weight[groups.single]
    else:
        scale = weight.index_select(0, modality_ids.reshape(-1)).reshape(x.shape)
    return (normed * scale.to(acc)).to(out_dtype)


def routed_rms_norm_backward_ref(grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float):
    acc = accumulation_dtype(x.dtype)
    d = x.shape[-1]
    groups = groups_of(modality_ids, weight.shape[0])
    x_rows, g_rows = (groups.to_sorted(t.reshape(-1, d)).to(acc) for t in (x, grad))
    rstd = torch.rsqrt(x_rows.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x_rows * rstd
    dx = torch.empty_like(x_rows)
    dweight = torch.zeros(weight.shape, device=x.device, dtype=acc)
    for m, start, stop in groups.slices():  # a modality may own several runs: accumulate
        g, xh = g_rows[start:stop], xhat[start:stop]
        gw = g * weight[m].to(acc)
        dx[start:stop] = rstd[start:stop] * (gw - xh * (gw * xh).mean(-1, keepdim=True))
        dweight[m] += (g * xh).sum(0)
    dx = groups.from_sorted(dx)
    return dx.to(x.dtype).reshape(x.shape), dweight.to(weight.dtype)


@torch.library.custom_op("sparsify::routed_rms_norm", mutates_args=())
def routed_rms_norm(x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_layer_norm import norm_forward

        return norm_forward(x, modality_ids, weight, None, eps, is_rms=True)
    return routed_rms_norm_ref(x, modality_ids, weight, eps)


@routed_rms_norm.register_fake
def _(x, modality_ids, weight, eps=1e-6, backend="auto"):
    return torch.empty(x.shape, device=x.device, dtype=torch.result_type(x, weight))


@torch.library.custom_op("sparsify::routed_rms_norm_backward", mutates_args=())
def routed_rms_norm_backward(
    grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_layer_norm import norm_backward

        dx, dweight, _ = norm_backward(grad, x, modality_ids, weight, weight.shape[0], eps, False, is_rms=True)
        return dx, dweight
    return routed_rms_norm_backward_ref(grad, x, modality_ids, weight, eps)


@routed_rms_norm_backward.register_fake
def _(grad, x, modality_ids, weight, eps, backend="auto"):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, modality_ids, weight, eps, backend = inputs
    ctx.save_for_backward(x, modality_ids, weight)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    x, modality_ids, weight = ctx.saved_tensors
    dx, dweight = torch.ops.sparsify.routed_rms_norm_backward(grad.contiguous(), x, modality_ids, weight, ctx.eps,
                                                              ctx.backend)
    return dx, None, dweight, None, None


routed_rms_norm.register_autograd(_backward, setup_context=_setup_context)
