"""`sparsify::routed_gather`: the per-token copy of a routed parameter, weight[ids].

weight is [M, *S], modality_ids any shape I; the result is [*I, *S]. The route
pass uses it for elementwise uses of a parameter (an RMSNorm scale, a bias added
by hand, a gate): it reshapes the result so it broadcasts against the tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of


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
