"""`sparsify::routed_layer_norm`: layer norm over the last dim with weight/bias of each token's modality.

x is [..., D], modality_ids x.shape[:-1], weight [M, D] or None, bias [M, D] or None.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._grouping import (accumulation_dtype, affine_per_token_, groups_of, per_modality_sum,
                                     times_per_token)
from sparsify.ops.backend import use_triton
from sparsify.ops.spec import RoutedOpSpec, UseKind, register
from sparsify.passes.norm_patterns import norm_match
from sparsify.errors import SparsifyError


def routed_layer_norm_ref(
    x: Tensor, modality_ids: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """Plain-PyTorch reference. One modality: F.layer_norm with its weights, exactly as dense. Several: the
    normalisation once over all rows, then each row's scale and shift: per run of one modality where the rows
    come in runs, else gathered per token (for an elementwise affine a [tokens, D] gather is cheaper than
    sorting rows into groups and back; affine_per_token_), in at least fp32 and rounded once."""
    stacked = weight if weight is not None else bias
    groups = groups_of(modality_ids, stacked.shape[0])
    d = x.shape[-1]
    if groups.single is not None:
        m = groups.single
        return F.layer_norm(x, (d,), None if weight is None else weight[m], None if bias is None else bias[m], eps)
    acc = accumulation_dtype(x.dtype)
    out = F.layer_norm(x.to(acc), (d,), None, None, eps).reshape(-1, d)
    return affine_per_token_(out, weight, bias, modality_ids, groups).to(x.dtype).reshape(x.shape)


def routed_layer_norm_backward_ref(
    grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Optional[Tensor], modalities: int, eps: float,
    has_bias: bool,
):
    """(dx, dweight, dbias), accumulated in at least fp32; dweight/dbias are empty when absent. Rows stay in
    token order: ATen's own layer norm (no affine) gives the normalised rows and, from the gradient scaled by
    each token's weight (times_per_token), dx; the parameter gradients are per-modality sums."""
    d = x.shape[-1]
    acc = accumulation_dtype(x.dtype)
    groups = groups_of(modality_ids, modalities)
    x_rows, g_rows = (t.reshape(-1, d).to(acc) for t in (x, grad))
    xhat, mean, rstd = torch.ops.aten.native_layer_norm(x_rows, (d,), None, None, eps)
    g_xhat = g_rows if weight is None else times_per_token(g_rows, weight, modality_ids, groups, "norm_gathered")
    dx = torch.ops.aten.native_layer_norm_backward(g_xhat, x_rows, (d,), mean, rstd, None, None,
                                                   [True, False, False])[0]
    dweight = per_modality_sum(xhat.mul_(g_rows), modality_ids, groups) if weight is not None else x.new_zeros(0)
    dbias = per_modality_sum(g_rows, modality_ids, groups) if has_bias else x.new_zeros(0)
    param_dtype = weight.dtype if weight is not None else x.dtype
    return dx.to(x.dtype).reshape(x.shape), dweight.to(param_dtype), dbias.to(param_dtype)


@torch.library.custom_op("sparsify::routed_layer_norm", mutates_args=())
def routed_layer_norm(
    x: Tensor, modality_ids: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    if weight is None and bias is None:
        raise SparsifyError("routed_layer_norm needs a stacked weight or bias; "
                            "use F.layer_norm when neither is routed.")
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_layer_norm import norm_forward

        return norm_forward(x, modality_ids, weight, bias, eps, is_rms=False)
    return routed_layer_norm_ref(x, modality_ids, weight, bias, eps)


@routed_layer_norm.register_fake
def _(x, modality_ids, weight, bias, eps=1e-5, backend="auto"):
    return torch.empty_like(x)


@torch.library.custom_op("sparsify::routed_layer_norm_backward", mutates_args=())
def routed_layer_norm_backward(
    grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Optional[Tensor], modalities: int, eps: float,
    has_bias: bool, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_layer_norm import norm_backward

        return norm_backward(grad, x, modality_ids, weight, modalities, eps, has_bias, is_rms=False)
    return routed_layer_norm_backward_ref(grad, x, modality_ids, weight, modalities, eps, has_bias)


@routed_layer_norm_backward.register_fake
def _(grad, x, modality_ids, weight, modalities, eps, has_bias, backend="auto"):
    d = x.shape[-1]
    dtype = weight.dtype if weight is not None else x.dtype
    return (
        torch.empty_like(x),
        x.new_empty((modalities, d) if weight is not None else (0,), dtype=dtype),
        x.new_empty((modalities, d) if has_bias else (0,), dtype=dtype),
    )


def _setup_context(ctx, inputs, output):
    x, modality_ids, weight, bias, eps, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, modality_ids, weight)
    ctx.modalities = (weight if weight is not None else bias).shape[0]
    ctx.eps = eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    x, modality_ids, weight = ctx.saved_tensors
    backward = routed_layer_norm_backward_ref if direct else \
        functools.partial(torch.ops.sparsify.routed_layer_norm_backward, backend=ctx.backend)
    dx, dweight, dbias = backward(grad.contiguous(), x, modality_ids, weight, ctx.modalities, ctx.eps, ctx.has_bias)
    return dx, None, (dweight if ctx.has_weight else None), (dbias if ctx.has_bias else None), None, None


routed_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def routed_layer_norm_direct(x, modality_ids, weight, bias, eps=1e-5, backend="torch"):
    """The op's signature without its dispatch or autograd (decoding steps, ops/eager.py)."""
    return routed_layer_norm_ref(x, modality_ids, weight, bias, eps)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
def _classify(node, operand: int, param_val):
    match = norm_match(node)
    if match is not None and match.kind == "layer" and node.args[operand] in (match.weight, match.bias):
        return ("layer_norm_pattern_weight" if node.args[operand] is match.weight else "layer_norm_pattern_bias"), None
    if node.target == torch.ops.aten.layer_norm.default:
        if operand in (2, 3) and len(node.args[1]) == 1:
            return ("layer_norm_weight" if operand == 2 else "layer_norm_bias"), None
        return "unsupported", "layer_norm over more than the last dim"
    return None


def _build(rw, x, ids, weight, bias, eps):
    """The routed node, and the dtype it computes in (the input's: the model may cast it afterwards)."""
    return rw.call(torch.ops.sparsify.routed_layer_norm.default, x, ids, weight, bias, eps), x.meta["val"].dtype


def _rewrite(rw, node, uses, args, stacked):
    """layer_norm(x, [D], w, b, eps), or a LayerNorm in any spelling norm_patterns knows
    =>  routed_layer_norm(x, ids, w, b, eps)"""
    if uses[0].norm is None:
        x, _, weight, bias, eps = (args + [None, None, 1e-5])[:5]
        return rw.fuse_norm(uses, stacked, _build, x=x, weight=weight, bias=bias, eps=eps, output=node)
    return rw.fuse_norm(uses, stacked, _build)


register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_layer_norm.default,
    uses=(UseKind("layer_norm_weight", "norm", 0, "rows", "[M, D] stacked", _rewrite),
          UseKind("layer_norm_bias", "norm", 0, "rows", "[M, D] stacked", _rewrite),
          UseKind("layer_norm_pattern_weight", "norm", None, "broadcast", "[M, D] stacked, fused norm", _rewrite),
          UseKind("layer_norm_pattern_bias", "norm", None, "broadcast", "[M, D] stacked, fused norm", _rewrite)),
    classify=_classify, direct=routed_layer_norm_direct, autograd=sys.modules[__name__], lowered=True,
    token_wise=True))
