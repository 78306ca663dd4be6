"""`sparsify::routed_linear`: y[t] = x[t] @ weight[ids[t]].T + bias[ids[t]].

x is [..., in_features], modality_ids has the shape x.shape[:-1], weight is
[M, out_features, in_features] and bias [M, out_features] or None. Forward and
backward are both custom ops so export and torch.compile keep them opaque (the
reference groups rows with data-dependent shapes that a tracer cannot follow).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of, scratch_buffer
from sparsify.modality_split import frozen_modalities_of
from sparsify.ops.backend import use_triton
from sparsify.ops.spec import RoutedOpSpec, UseKind, register
from sparsify.passes import node_value
from sparsify.passes.param_uses import MATMUL_OPS


def routed_linear_ref(x: Tensor, modality_ids: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Plain-PyTorch reference: one GEMM per slice of rows (ModalityGroups): per run of one modality in place,
    or per modality after one sort; one F.linear on x as it is when a single modality holds every row. On CPU,
    2-16 rows (a decoding step) and slices of 2-16 rows are products in the W @ X^T form (FEW_ROWS)."""
    groups = groups_of(modality_ids, weight.shape[0])
    out_shape = (*x.shape[:-1], weight.shape[1])
    out_dtype = torch.result_type(x, weight)
    same_dtype = x.dtype == weight.dtype == out_dtype and (bias is None or bias.dtype == out_dtype)
    transposed_form = same_dtype and x.device.type == "cpu"  # for products of FEW_ROWS rows

    def few(rows: int) -> bool:
        return transposed_form and FEW_ROWS[0] <= rows <= FEW_ROWS[1]

    if few(modality_ids.numel()):  # ids have x's shape but its last dim: one per row
        return _few_rows_linear(x.reshape(-1, x.shape[-1]), weight, bias, groups).reshape(out_shape)
    if groups.single is not None:
        m = groups.single
        return F.linear(x, weight[m], None if bias is None else bias[m])
    x_rows = x.reshape(-1, x.shape[-1])
    x_sorted = groups.to_sorted(x_rows, scratch="rows_in")
    out = x_rows.new_empty(x_rows.shape[0], weight.shape[1], dtype=out_dtype) if groups.order is None else \
        scratch_buffer("rows_out", (x_rows.shape[0], weight.shape[1]), out_dtype, x.device)
    modalities, sizes = groups.split
    weights_t = weight.transpose(1, 2).unbind(0)
    biases = [None] * weight.shape[0] if bias is None else bias.unbind(0)
    for m, rows, out_rows in zip(modalities, x_sorted.split_with_sizes(sizes), out.split_with_sizes(sizes)):
        if few(rows.shape[0]):  # a few rows of a larger batch's step
            out_rows.copy_(_transposed_product(weight[m], biases[m], rows).t())
        else:
            _matmul_into(out_rows, rows, weights_t[m], biases[m], same_dtype=same_dtype)
    return groups.from_sorted(out).reshape(out_shape)


# A decoding step's linear is a product of a few rows (one per sequence of the batch) with a weight that has to
# come from memory. For 2-16 rows MKL's sgemm (torch 2.13, this machine's AMD EPYC) streams the weight 1.3-3x
# faster when asked for the product transposed, W @ X^T, than for X @ W^T as F.linear asks (1.1x slower at 8 rows
# of one 2048 x 2048 weight, about even for weights that sit in cache): benchmarks/bench_routed_ops.py --few-rows
# measures both forms. One row is a GEMV either way, kept as F.linear asks for it (the faster of the two there).
FEW_ROWS = (2, 16)


def _few_rows_linear(x_rows: Tensor, weight: Tensor, bias: Optional[Tensor], groups) -> Tensor:
    """x_rows [rows, in] (2-16 rows, one dtype throughout) through each row's modality's weight, as W @ X^T. With
    several modalities among the rows, every present modality's weight takes all the rows (a few rows: the
    products cost nothing next to reading the weights, which each row's modality needs anyway) and each row
    keeps its own modality's column: no sort, no split into one- or two-row products, where MKL is slowest."""
    def bias_of(m):
        return None if bias is None else bias[m]

    if groups.single is not None:
        return _transposed_product(weight[groups.single], bias_of(groups.single), x_rows).t().contiguous()
    present, (slot_of_row, row) = groups.present, groups.present_slots
    first, last = present[0], present[-1]
    if last - first + 1 == len(present):  # consecutive modalities: their stacked weights are one [P * out, in] GEMM
        products = _transposed_product(weight[first:last + 1].flatten(0, 1),
                                       None if bias is None else bias[first:last + 1].flatten(), x_rows)
    else:
        products = torch.stack([_transposed_product(weight[m], bias_of(m), x_rows) for m in present])
    products = products.view(len(present), weight.shape[1], x_rows.shape[0])  # [present, out, rows]
    return products[slot_of_row, :, row]  # [rows, out]: row r's column of its modality's product


def _transposed_product(weight: Tensor, bias: Optional[Tensor], rows: Tensor) -> Tensor:
    """(rows @ weight.T + bias).T as weight @ rows.T: [out, rows] (see FEW_ROWS)."""
    if bias is None:
        return torch.mm(weight, rows.t())
    return torch.addmm(bias.unsqueeze(1), weight, rows.t())


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor] = None, accumulate: bool = False,
                 same_dtype: bool = False) -> None:
    """out = a @ b (+ bias), or out += a @ b, written straight into `out` (a slice of a grouped buffer) where
    the dtypes allow (`same_dtype`: the caller checked a, b, out and bias once for all its slices), rather than
    into a temporary that is then copied in."""
    if same_dtype:
        if accumulate:
            out.addmm_(a, b)
        elif bias is None:
            torch.mm(a, b, out=out)
        else:
            torch.addmm(bias, a, b, out=out)
    else:
        product = a @ b if bias is None else torch.addmm(bias, a, b)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)


def routed_linear_backward_ref(grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, has_bias: bool,
                               frozen: Optional[list[int]] = None):
    """Gradients (dx, dweight, dbias) of routed_linear_ref; dbias is empty when has_bias is False. The `frozen`
    modalities' weight and bias gradients are not computed (their GEMMs skipped): zero in dweight and dbias."""
    frozen = set(frozen or ())
    groups = groups_of(modality_ids, weight.shape[0])
    x_rows = groups.to_sorted(x.reshape(-1, x.shape[-1]), scratch="rows_in")
    grad_rows = groups.to_sorted(grad.reshape(-1, weight.shape[1]), scratch="rows_grad")
    dx = torch.empty_like(x_rows) if groups.order is None else \
        scratch_buffer("rows_out", x_rows.shape, x_rows.dtype, x.device)
    dweight = torch.empty_like(weight)
    acc = accumulation_dtype(grad.dtype)
    dbias = grad.new_zeros((weight.shape[0], weight.shape[1]) if has_bias else (0,), dtype=acc)
    same_dtype = grad.dtype == x.dtype == weight.dtype
    modalities, sizes = groups.split
    weights, dweights = weight.unbind(0), dweight.unbind(0)
    seen = set()
    for m, g, x_slice, dx_slice in zip(modalities, grad_rows.split_with_sizes(sizes), x_rows.split_with_sizes(sizes),
                                     dx.split_with_sizes(sizes)):
        # a modality may own several runs: its gradients accumulate
        _matmul_into(dx_slice, g, weights[m], same_dtype=same_dtype)
        if m in frozen:
            continue
        _matmul_into(dweights[m], g.t(), x_slice, accumulate=m in seen, same_dtype=same_dtype)
        seen.add(m)
        if has_bias:
            dbias[m] += g.sum(0, dtype=acc)
    for m in set(range(weight.shape[0])) - seen:  # a modality without rows (or frozen) gets exactly zero
        dweight[m].zero_()
    return groups.from_sorted(dx).reshape(x.shape), dweight, dbias.to(weight.dtype)


@torch.library.custom_op("sparsify::routed_linear", mutates_args=())
def routed_linear(
    x: Tensor, modality_ids: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: str = "auto"
) -> Tensor:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_linear import routed_linear_forward

        return routed_linear_forward(x, modality_ids, weight, bias)
    return routed_linear_ref(x, modality_ids, weight, bias)


@routed_linear.register_fake
def _(x, modality_ids, weight, bias=None, backend="auto"):
    return x.new_empty(*x.shape[:-1], weight.shape[1], dtype=torch.result_type(x, weight))


@torch.library.custom_op("sparsify::routed_linear_backward", mutates_args=())
def routed_linear_backward(
    grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, has_bias: bool, backend: str = "auto",
    frozen: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_linear import routed_linear_backward as triton_backward

        return triton_backward(grad, x, modality_ids, weight, has_bias, frozen=frozen)
    return routed_linear_backward_ref(grad, x, modality_ids, weight, has_bias, frozen)


@routed_linear_backward.register_fake
def _(grad, x, modality_ids, weight, has_bias, backend="auto", frozen=None):
    dbias_shape = (weight.shape[0], weight.shape[1]) if has_bias else (0,)
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(dbias_shape)


def _setup_context(ctx, inputs, output):
    x, modality_ids, weight, bias, backend = inputs
    ctx.save_for_backward(x, modality_ids, weight)
    ctx.has_bias = bias is not None
    ctx.backend = backend
    # Modalities whose copies of the weight are frozen (modality_split.py): their dW is not computed. Known where
    # the weight is the stack of a split model's copies as it is (not transposed, not traced).
    ctx.frozen = list(frozen_modalities_of(weight))


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    x, modality_ids, weight = ctx.saved_tensors
    frozen = ctx.frozen or None
    if direct:
        dx, dweight, dbias = routed_linear_backward_ref(grad.contiguous(), x, modality_ids, weight, ctx.has_bias,
                                                        frozen)
    else:
        dx, dweight, dbias = torch.ops.sparsify.routed_linear_backward(
            grad.contiguous(), x, modality_ids, weight, ctx.has_bias, ctx.backend, frozen)
    return dx, None, dweight, (dbias if ctx.has_bias else None), None


routed_linear.register_autograd(_backward, setup_context=_setup_context)


def routed_linear_direct(x, modality_ids, weight, bias=None, backend="torch"):
    """The op's signature without its dispatch or autograd (decoding steps, ops/eager.py)."""
    return routed_linear_ref(x, modality_ids, weight, bias)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
aten = torch.ops.aten


def _classify(node, operand: int, param_val):
    target, args = node.target, node.args
    if target == aten.linear.default:
        return ("linear_weight", None) if operand == 1 else ("linear_bias", None) if operand == 2 else (
            "unsupported", "the parameter is the input of a linear, not its weight or bias")
    if target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "unsupported", "addmm with beta/alpha scaling"
        if operand == 2 and param_val.dim() == 2:
            return "addmm_weight", None
        if operand == 0 and param_val.dim() == 1:
            return "addmm_bias", None
        return "unsupported", "the parameter is the activation operand of an addmm"
    if target in MATMUL_OPS:
        other = node_value(args[1 - operand])
        if param_val.dim() != 2 or other is None:
            return "unsupported", "only a 2-D weight matrix can be routed in a matmul"
        if operand == 1:
            return "matmul_weight_right", None
        if other.dim() >= 2:
            return "matmul_weight_left", None
        return "unsupported", "a matrix-vector product has no token dim"
    return None


def _rewrite_linear(rw, node, uses, args, stacked):
    """linear(x, w, b)  =>  routed_linear(x, ids, w_stacked, b_stacked)"""
    x, bias = args[0], args[2] if len(args) > 2 else None
    return rw.call(torch.ops.sparsify.routed_linear.default, x, rw.ids_for(uses[0].token_axes, rw.lead(uses), x),
                   rw.stacked(args[1], stacked), rw.stacked(bias, stacked))


def _rewrite_addmm(rw, node, uses, args, stacked):
    """addmm(b, x, w)  =>  routed_linear(x, ids, w_stacked.transpose(1, 2), b_stacked)  (GPT-2's Conv1D)"""
    x = args[1]
    weight = rw.call(aten.transpose.int, rw.stacked(args[2], stacked), 1, 2)
    return rw.call(torch.ops.sparsify.routed_linear.default, x, rw.ids_for(uses[0].token_axes, rw.lead(uses), x),
                   weight, rw.stacked(args[0], stacked))


def _rewrite_matmul_right(rw, node, uses, args, stacked):
    """x @ w  =>  routed_linear(x, ids, w_stacked.transpose(1, 2))"""
    x = args[0]
    weight = rw.call(aten.transpose.int, rw.stacked(args[1], stacked), 1, 2)
    return rw.call(torch.ops.sparsify.routed_linear.default, x, rw.ids_for(uses[0].token_axes, rw.lead(uses), x),
                   weight, None)


def _rewrite_matmul_left(rw, node, uses, args, stacked):
    """w @ x  =>  routed_linear(x.mT, ids, w_stacked).mT  (mamba_ssm's projections)"""
    x_t = rw.call(aten.transpose.int, args[1], -1, -2)
    y_t = rw.call(torch.ops.sparsify.routed_linear.default, x_t, rw.ids_for(uses[0].token_axes, rw.lead(uses), x_t),
                  rw.stacked(args[0], stacked), None)
    return rw.call(aten.transpose.int, y_t, -1, -2)


register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_linear.default,
    uses=(
        UseKind("linear_weight", "linear", 0, "rows", "[M, out, in] stacked", _rewrite_linear),
        UseKind("linear_bias", "linear", 0, "rows", "[M, out] stacked", _rewrite_linear),
        UseKind("addmm_weight", "linear", 1, "rows", "[M, in, out] stacked, transposed to [M, out, in]",
                _rewrite_addmm),
        UseKind("addmm_bias", "linear", 1, "rows", "[M, out] stacked", _rewrite_addmm),
        UseKind("matmul_weight_right", "linear", 0, "rows", "[M, in, out] stacked, transposed",
                _rewrite_matmul_right),
        UseKind("matmul_weight_left", "linear", 1, "columns", "[M, out, in] stacked, x transposed",
                _rewrite_matmul_left),
    ),
    classify=_classify, direct=routed_linear_direct, autograd=sys.modules[__name__], lowered=True, token_wise=True))
