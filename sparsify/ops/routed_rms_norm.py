"""`sparsify::routed_rms_norm`: RMS norm over the last dim with the scale of each token's modality.

y = weight[ids] * (x * rsqrt(mean(x^2) + eps)), statistics in fp32 (as Llama's RMSNorm).
x is [..., D], modality_ids x.shape[:-1], weight [M, D]. The Triton kernel is the
shared norm kernel in sparsify/kernels/routed_layer_norm.py (IS_RMS=True).
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._grouping import (accumulation_dtype, affine_per_token_, groups_of, per_modality_sum,
                                     scratch_buffer, times_per_token)
from sparsify.ops.backend import use_triton
from sparsify.ops.spec import RoutedOpSpec, UseKind, register
from sparsify.passes.norm_patterns import norm_match


def routed_rms_norm_ref(x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float) -> Tensor:
    d = x.shape[-1]
    acc = accumulation_dtype(x.dtype)
    groups = groups_of(modality_ids, weight.shape[0])
    if x.dtype == weight.dtype == acc:
        # ATen's rms_norm is one call for the steps below (on CPU the same result, bitwise, in fp32 / fp64):
        # a decoding step's norm is a few rows, where each call's dispatch is the cost.
        if groups.single is not None:
            return F.rms_norm(x, (d,), weight[groups.single], eps)
        normed = F.rms_norm(x.reshape(-1, d), (d,), None, eps)
    else:
        x_acc = x.reshape(-1, d).to(acc)
        normed = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    # the scale per run of one modality, or gathered per token into a reused buffer, applied in place
    affine_per_token_(normed, weight, None, modality_ids, groups)
    return normed.to(torch.result_type(x, weight)).reshape(x.shape)


def routed_rms_norm_backward_ref(grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, eps: float):
    """(dx, dweight) in at least fp32, rows in token order (per_token scales, per_modality_sum gradient), the
    [tokens, D] intermediates in scratch buffers written in place (as routed_layer_norm_backward_ref)."""
    acc = accumulation_dtype(x.dtype)
    d = x.shape[-1]
    groups = groups_of(modality_ids, weight.shape[0])
    x_rows, g_rows = (t.reshape(-1, d).to(acc) for t in (x, grad))
    rows = (x_rows.shape[0], d)
    product = scratch_buffer("norm_product", rows, acc, x.device)
    rstd = torch.rsqrt(torch.mul(x_rows, x_rows, out=product).mean(-1, keepdim=True) + eps)
    xhat = torch.mul(x_rows, rstd, out=scratch_buffer("norm_xhat", rows, acc, x.device))
    dweight = per_modality_sum(torch.mul(g_rows, xhat, out=product), modality_ids, groups)
    gw = times_per_token(g_rows, weight, modality_ids, groups, "norm_gathered")
    # dx = rstd * (gw - xhat * mean(gw * xhat))
    dx = torch.mul(xhat, torch.mul(gw, xhat, out=product).mean(-1, keepdim=True),
                   out=torch.empty(rows, dtype=acc, device=x.device))
    dx.neg_().add_(gw).mul_(rstd)
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


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    x, modality_ids, weight = ctx.saved_tensors
    backward = routed_rms_norm_backward_ref if direct else \
        functools.partial(torch.ops.sparsify.routed_rms_norm_backward, backend=ctx.backend)
    dx, dweight = backward(grad.contiguous(), x, modality_ids, weight, ctx.eps)
    return dx, None, dweight, None, None


routed_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def routed_rms_norm_direct(x, modality_ids, weight, eps=1e-6, backend="torch"):
    """The op's signature without its dispatch or autograd (decoding steps, ops/eager.py)."""
    return routed_rms_norm_ref(x, modality_ids, weight, eps)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
def _classify(node, operand: int, param_val):
    match = norm_match(node)
    if match is not None and match.kind == "rms" and node.args[operand] is match.weight:
        return "rms_norm_pattern_weight", None
    if node.target == torch.ops.aten.rms_norm.default:
        if operand == 2 and len(node.args[1]) == 1:
            return "rms_norm_weight", None
        return "unsupported", "rms_norm over more than the last dim"
    return None


def _build(rw, x, ids, weight, bias, eps):
    """The routed node, and the dtype it computes in (the input's and the weight's promoted: the model may
    cast the normalised value back before the scale, as Llama does)."""
    computed = torch.promote_types(x.meta["val"].dtype, weight.meta["val"].dtype)
    return rw.call(torch.ops.sparsify.routed_rms_norm.default, x, ids, weight, eps), computed


def _rewrite(rw, node, uses, args, stacked):
    """rms_norm(x, [D], w, eps), or an RMSNorm in any spelling norm_patterns knows  =>  routed_rms_norm(x, ids, w)"""
    if uses[0].norm is None:  # aten.rms_norm: eps None means the dtype's machine epsilon
        eps = (args + [None])[3]
        eps = torch.finfo(args[0].meta["val"].dtype).eps if eps is None else eps
        return rw.fuse_norm(uses, stacked, _build, x=args[0], weight=args[2], bias=None, eps=eps, output=node)
    return rw.fuse_norm(uses, stacked, _build)


register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_rms_norm.default,
    uses=(UseKind("rms_norm_weight", "norm", 0, "rows", "[M, D] stacked", _rewrite),
          UseKind("rms_norm_pattern_weight", "norm", None, "broadcast", "[M, D] stacked, fused norm", _rewrite)),
    classify=_classify, direct=routed_rms_norm_direct, autograd=sys.modules[__name__], lowered=True,
    token_wise=True))
