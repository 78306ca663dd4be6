"""`sparsify::routed_gather`: the per-token copy of a routed parameter, weight[ids].

weight is [M, *S], modality_ids any shape I; the result is [*I, *S]. The route
pass uses it for elementwise uses of a parameter (an RMSNorm scale, a bias added
by hand, a gate): it reshapes the result so it broadcasts against the tokens.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of
from sparsify.ops.spec import RoutedOpSpec, UseKind, register
from sparsify.passes.param_uses import ELEMENTWISE_OPS, is_matmul_output, is_normalized


def routed_gather_ref(weight: Tensor, modality_ids: Tensor) -> Tensor:
    groups_of(modality_ids, weight.shape[0])  # validates the ids, once per ids tensor
    return weight.index_select(0, modality_ids.reshape(-1)).reshape(*modality_ids.shape, *weight.shape[1:])


def routed_gather_backward_ref(grad: Tensor, modality_ids: Tensor, modalities: int) -> Tensor:
    """Sum of the per-token gradients into each modality's copy, accumulated in at least fp32."""
    flat_ids = modality_ids.reshape(-1)
    param_shape = grad.shape[modality_ids.dim():]
    dweight = grad.new_zeros((modalities, *param_shape), dtype=accumulation_dtype(grad.dtype))
    dweight.index_add_(0, flat_ids, grad.reshape(flat_ids.numel(), *param_shape).to(dweight.dtype))
    return dweight.to(grad.dtype)


@torch.library.custom_op("sparsify::routed_gather", mutates_args=())
def routed_gather(weight: Tensor, modality_ids: Tensor) -> Tensor:
    return routed_gather_ref(weight, modality_ids)


@routed_gather.register_fake
def _(weight, modality_ids):
    return weight.new_empty(*modality_ids.shape, *weight.shape[1:])


@torch.library.custom_op("sparsify::routed_gather_backward", mutates_args=())
def routed_gather_backward(grad: Tensor, modality_ids: Tensor, modalities: int) -> Tensor:
    return routed_gather_backward_ref(grad, modality_ids, modalities)


@routed_gather_backward.register_fake
def _(grad, modality_ids, modalities):
    return grad.new_empty(modalities, *grad.shape[modality_ids.dim():])


def _setup_context(ctx, inputs, output):
    weight, modality_ids = inputs
    ctx.save_for_backward(modality_ids)
    ctx.modalities = weight.shape[0]


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    (modality_ids,) = ctx.saved_tensors
    backward = routed_gather_backward_ref if direct else torch.ops.sparsify.routed_gather_backward
    return backward(grad, modality_ids, ctx.modalities), None


routed_gather.register_autograd(_backward, setup_context=_setup_context)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
# Any elementwise use of a parameter: a norm's scale no pattern fused, a bias added by hand, a gate, a
# learned residual scale. Registered last (ops/__init__.py): the ops above claim their own forms first.
aten = torch.ops.aten


def _classify(node, operand: int, param_val):
    if node.target in (torch.ops.sparsify.selective_scan.default,
                       torch.ops.sparsify.selective_scan_with_state.default) and operand == 7:
        return "scan_delta_bias", None  # dt_proj's bias, which the scan adds to delta before softplus
    if node.target in ELEMENTWISE_OPS:
        other = node.args[1 - operand] if len(node.args) > 1 else None
        if node.target == aten.mul.Tensor and param_val.dim() == 1 and is_normalized(other):
            return "norm_like_scale", None  # a norm no pattern knows: routed exactly, but as a plain scale
        if node.target == aten.add.Tensor and is_matmul_output(other):
            return "bias_add", None  # e.g. softplus(dt_proj.weight @ x + dt_proj.bias[:, None])
        return "elementwise", None
    return None


def _rewrite_elementwise(rw, node, uses, args, stacked):
    """mul(w, h)  =>  mul(routed_gather(w_stacked, ids) shaped to broadcast, h)"""
    for use in uses:
        node.update_arg(use.operand, rw.gathered(use, args[use.operand]))
    return None


def _rewrite_scan_delta_bias(rw, node, uses, args, stacked):
    """scan(u, delta, ..., delta_bias=b)  =>  scan(u, delta + routed_gather(b_stacked, ids), ..., None):
    softplus(delta + bias) inside the scan is the scan of (delta + per-token bias) without one."""
    delta = rw.call(aten.add.Tensor, args[1], rw.gathered(uses[0], args[7]))
    node.update_arg(1, delta)
    node.update_arg(7, None)
    return None


GATHERED = "per-token copies gathered"
register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_gather.default,
    uses=(UseKind("norm_like_scale", "norm", None, "broadcast", f"{GATHERED} (norm not fused)",
                  _rewrite_elementwise, gathered=True),
          UseKind("bias_add", "linear", None, "broadcast", GATHERED, _rewrite_elementwise, gathered=True),
          UseKind("elementwise", "elementwise", None, "broadcast", GATHERED, _rewrite_elementwise, gathered=True),
          UseKind("scan_delta_bias", "linear", 1, "channels_first", "per-token copies added to delta",
                  _rewrite_scan_delta_bias, gathered=True)),
    classify=_classify, direct=routed_gather_ref, autograd=sys.modules[__name__]))
