"""The routed ops called without torch.library's dispatch, where a graph runs eagerly on the torch backend.

A custom op call costs 30-50 us on CPU before any work (argument handling, its autograd wrapper), forward and
backward alike: with ~70 routed ops and their backwards, a tenth of a small Llama's training step. Two forms:

    direct   the reference itself, for a decoding step under no_grad (the references write into scratch
             buffers with out=, which autograd refuses)
    eager    the op's own autograd (setup_context, backward) around the reference, backward called directly:
             the module tree's forwards (training)

An eager call made while a tracer runs (torch.compile, export, fake or other tensor subclasses) is the custom
op itself, so compiled and exported graphs still hold one opaque node per routed op. Triton-lowered ops keep
the custom op (their backward is the kernels').
"""
from __future__ import annotations

import importlib

import torch

sparsify_ops = torch.ops.sparsify
# The op modules (sparsify.ops re-exports each op under its module's name, so `from sparsify.ops import
# routed_linear` is the op, not the module).
routed_linear, routed_rms_norm, routed_layer_norm, routed_conv1d, routed_gather, permute_rows = (
    importlib.import_module(f"sparsify.ops.{name}") for name in
    ("routed_linear", "routed_rms_norm", "routed_layer_norm", "routed_conv1d", "routed_gather", "permute_rows"))


def routed_linear_direct(x, modality_ids, weight, bias=None, backend="torch"):
    return routed_linear.routed_linear_ref(x, modality_ids, weight, bias)


def routed_rms_norm_direct(x, modality_ids, weight, eps=1e-6, backend="torch"):
    return routed_rms_norm.routed_rms_norm_ref(x, modality_ids, weight, eps)


def routed_layer_norm_direct(x, modality_ids, weight, bias, eps=1e-5, backend="torch"):
    return routed_layer_norm.routed_layer_norm_ref(x, modality_ids, weight, bias, eps)


def routed_conv1d_direct(x, modality_ids, weight, bias=None, backend="torch"):
    return routed_conv1d.routed_conv1d_ref(x, modality_ids, weight, bias)


# op -> (its direct form, the module holding its autograd). routed_gather and permute_rows have one
# implementation and no backend argument; the others take the direct form only where lowered to "torch".
FORMS = {
    sparsify_ops.routed_linear.default: (routed_linear_direct, routed_linear),
    sparsify_ops.routed_rms_norm.default: (routed_rms_norm_direct, routed_rms_norm),
    sparsify_ops.routed_layer_norm.default: (routed_layer_norm_direct, routed_layer_norm),
    sparsify_ops.routed_conv1d.default: (routed_conv1d_direct, routed_conv1d),
    sparsify_ops.routed_gather.default: (routed_gather.routed_gather_ref, routed_gather),
    sparsify_ops.permute_rows.default: (permute_rows.permute_rows_direct, permute_rows),
}


def direct_form(node_target, kwargs) -> object | None:
    """The direct function for a call of `node_target` with these kwargs, or None (not routed, or Triton)."""
    form = FORMS.get(node_target)
    if form is None or kwargs.get("backend", "torch") != "torch":
        return None
    return form[0]


class _Eager(torch.autograd.Function):
    """forward = the op's direct form, then the op's own setup_context; backward = the op's own one.

    The ctx-taking forward (no separate setup_context staticmethod) because Function.apply binds the
    arguments of a forward that has one with inspect.signature on every call: ~80 us, a tenth of a call."""

    @staticmethod
    def forward(ctx, op, *inputs):
        output = FORMS[op][0](*inputs)
        ctx.sparsify_op = op
        FORMS[op][1]._setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return None, *FORMS[ctx.sparsify_op][1]._backward(ctx, *grads, direct=True)


def _traced(tensors) -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or any(
        type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors
        if isinstance(t, torch.Tensor))


def eager_form(op):
    """A function with the op's signature that runs it eagerly (see the module) or, under a tracer, calls it."""
    def call(*args, **kwargs):
        if _traced((*args, *kwargs.values())):
            return op(*args, **kwargs)
        inputs = _bind(op, args, kwargs)
        return _Eager.apply(op, *inputs)
    call.__name__ = call.__qualname__ = f"{op._schema.name.split('::')[-1]}_eager"
    return call


def _bind(op, args, kwargs) -> list:
    """Every argument of op's schema in order, defaults filled in (setup_context unpacks them all)."""
    values = list(args)
    for argument in op._schema.arguments[len(args):]:
        values.append(kwargs[argument.name] if argument.name in kwargs else argument.default_value)
    return values


EAGER = {op: eager_form(op) for op in FORMS}


def eager_form_of(node_target, kwargs) -> object | None:
    """The eager function for a call of `node_target` with these kwargs, or None (not routed, or Triton)."""
    if direct_form(node_target, kwargs) is None:
        return None
    return EAGER[node_target]
