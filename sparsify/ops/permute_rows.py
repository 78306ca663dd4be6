"""`sparsify::permute_rows`: rows[order], where order is a permutation whose inverse is given too.

The hoist pass puts a region's rows into modality order and back with it. As `aten.index_select` the
backward would be an index_add into a zeroed [tokens, D] tensor (a fill and a scatter, per permutation per
step); for a permutation it is a gather by the inverse, as parallel as the forward. Where the order is the
identity (every token of one modality, or ids already sorted) the eager forms return the rows themselves:
the custom op itself never aliases its input (torch.library requires a fresh output).
"""
from __future__ import annotations

import sys
import weakref

import torch
from torch import Tensor

from sparsify.ops.spec import RoutedOpSpec, register


def permute_rows_ref(rows: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    return rows.index_select(0, order)


def permute_rows_direct(rows: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """The eager form: the rows themselves where order is the identity, else the gather."""
    return rows if is_identity(order) else rows.index_select(0, order)


# Each forward computes one order (and its inverse) shared by every permutation of the graph: whether it is
# the identity is worked out once per order tensor (one host sync), memoised by identity and version.
_IDENTITY: dict[int, tuple] = {}


def is_identity(order: Tensor) -> bool:
    hit = _IDENTITY.get(id(order))
    if hit is not None and hit[0]() is order and hit[1] == order._version:
        return hit[2]
    identity = bool((order == torch.arange(order.numel(), device=order.device)).all())
    if len(_IDENTITY) > 64:
        for key in [k for k, v in _IDENTITY.items() if v[0]() is None]:
            del _IDENTITY[key]
    _IDENTITY[id(order)] = (weakref.ref(order), order._version, identity)
    return identity


@torch.library.custom_op("sparsify::permute_rows", mutates_args=())
def permute_rows(rows: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    return permute_rows_ref(rows, order, inverse)


@permute_rows.register_fake
def _(rows, order, inverse):
    return rows.new_empty(order.shape[0], *rows.shape[1:])


def _setup_context(ctx, inputs, output):
    _, order, inverse = inputs
    ctx.save_for_backward(order, inverse)


def _backward(ctx, grad, direct: bool = False):
    """`direct`: the eager form (ops/eager.py). The gradient of rows[order] is grad[inverse]."""
    order, inverse = ctx.saved_tensors
    if direct:
        return permute_rows_direct(grad, inverse, order), None, None
    return torch.ops.sparsify.permute_rows(grad, inverse, order), None, None


permute_rows.register_autograd(_backward, setup_context=_setup_context)


register(RoutedOpSpec(op=torch.ops.sparsify.permute_rows.default, uses=(), direct=permute_rows_direct,
                      autograd=sys.modules[__name__]))  # hoist's permutations: eager forms only, no dense use
