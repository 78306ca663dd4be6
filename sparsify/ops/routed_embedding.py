"""`sparsify::routed_embedding`: an embedding table per modality, out[t] = weight[ids[t], indices[t]].

indices and modality_ids have the same shape I; weight is [M, V, D]; the result is [*I, D]. A row equal to
`padding_idx` gets no gradient, as nn.Embedding's. Shared by default under every preset (the papers keep
embeddings shared); `include=` selects a table, and a tied LM head then routes with it (its use is a
linear: routed_linear).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of
from sparsify.ops.spec import RoutedOpSpec, UseKind, register


def _rows(indices: Tensor, modality_ids: Tensor, vocab: int) -> Tensor:
    """Each token's row in the [M * V, D] view of the stacked table."""
    return (modality_ids.reshape(-1) * vocab + indices.reshape(-1)).long()


def routed_embedding_ref(indices: Tensor, modality_ids: Tensor, weight: Tensor, padding_idx: int = -1) -> Tensor:
    modalities, vocab, dim = weight.shape
    groups_of(modality_ids, modalities)  # validates the ids, once per ids tensor
    rows = weight.reshape(modalities * vocab, dim).index_select(0, _rows(indices, modality_ids, vocab))
    return rows.reshape(*indices.shape, dim)


def routed_embedding_backward_ref(grad: Tensor, indices: Tensor, modality_ids: Tensor, modalities: int, vocab: int,
                                  padding_idx: int = -1) -> Tensor:
    """Each token's gradient summed into its modality's row of its token, accumulated in at least fp32."""
    dim = grad.shape[-1]
    grad_rows = grad.reshape(-1, dim).to(accumulation_dtype(grad.dtype))
    if padding_idx >= 0:
        grad_rows = grad_rows * (indices.reshape(-1, 1) != padding_idx)
    dweight = grad_rows.new_zeros(modalities * vocab, dim)
    dweight.index_add_(0, _rows(indices, modality_ids, vocab), grad_rows)
    return dweight.reshape(modalities, vocab, dim).to(grad.dtype)


@torch.library.custom_op("sparsify::routed_embedding", mutates_args=())
def routed_embedding(indices: Tensor, modality_ids: Tensor, weight: Tensor, padding_idx: int = -1) -> Tensor:
    return routed_embedding_ref(indices, modality_ids, weight, padding_idx)


@routed_embedding.register_fake
def _(indices, modality_ids, weight, padding_idx=-1):
    return weight.new_empty(*indices.shape, weight.shape[-1])


@torch.library.custom_op("sparsify::routed_embedding_backward", mutates_args=())
def routed_embedding_backward(grad: Tensor, indices: Tensor, modality_ids: Tensor, modalities: int, vocab: int,
                              padding_idx: int = -1) -> Tensor:
    return routed_embedding_backward_ref(grad, indices, modality_ids, modalities, vocab, padding_idx)


@routed_embedding_backward.register_fake
def _(grad, indices, modality_ids, modalities, vocab, padding_idx=-1):
    return grad.new_empty(modalities, vocab, grad.shape[-1])


def _setup_context(ctx, inputs, output):
    indices, modality_ids, weight, padding_idx = inputs
    ctx.save_for_backward(indices, modality_ids)
    ctx.modalities, ctx.vocab, ctx.padding_idx = weight.shape[0], weight.shape[1], padding_idx


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    indices, modality_ids = ctx.saved_tensors
    backward = routed_embedding_backward_ref if direct else torch.ops.sparsify.routed_embedding_backward
    return None, None, backward(grad, indices, modality_ids, ctx.modalities, ctx.vocab, ctx.padding_idx), None


routed_embedding.register_autograd(_backward, setup_context=_setup_context)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
aten = torch.ops.aten


def _classify(node, operand: int, param_val):
    if node.target != aten.embedding.default:
        return None
    if operand != 0 or param_val.dim() != 2:
        return "unsupported", "the parameter is the index operand of an embedding lookup"
    if any(node.args[3:5]) or any(node.kwargs.get(k) for k in ("scale_grad_by_freq", "sparse")):
        return "unsupported", "an embedding with scale_grad_by_freq or sparse gradients"
    return "embedding", None


def _rewrite(rw, node, uses, args, stacked):
    """embedding(w, indices, padding_idx)  =>  routed_embedding(indices, ids, w_stacked, padding_idx)"""
    indices = args[1]
    padding_idx = args[2] if len(args) > 2 else node.kwargs.get("padding_idx", -1)
    ids = rw.ids_for(uses[0].token_axes, rw.lead(uses), indices)
    return rw.call(torch.ops.sparsify.routed_embedding.default, indices, ids, rw.stacked(args[0], stacked),
                   -1 if padding_idx is None else padding_idx)


register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_embedding.default,
    uses=(UseKind("embedding", "embedding", 1, "indices", "[M, V, D] stacked, rows by token and modality",
                  _rewrite),),
    classify=_classify, direct=routed_embedding_ref, autograd=sys.modules[__name__], shared_by_default=True))
