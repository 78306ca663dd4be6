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

import torch

from sparsify.ops.spec import SPECS, spec_of


def direct_form(node_target, kwargs) -> object | None:
    """The direct function for a call of `node_target` with these kwargs, or None (not routed, or Triton).
    Ops without a backend argument have one implementation; the others take it only where lowered to "torch"."""
    spec = spec_of(node_target)
    if spec is None or spec.direct is None or kwargs.get("backend", "torch") != "torch":
        return None
    return spec.direct


class _Eager(torch.autograd.Function):
    """forward = the op's direct form, then the op's own setup_context; backward = the op's own one.

    The ctx-taking forward (no separate setup_context staticmethod) because Function.apply binds the
    arguments of a forward that has one with inspect.signature on every call: ~80 us, a tenth of a call."""

    @staticmethod
    def forward(ctx, op, *inputs):
        spec = spec_of(op)
        output = spec.direct(*inputs)
        ctx.sparsify_spec = spec
        spec.autograd._setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return None, *ctx.sparsify_spec.autograd._backward(ctx, *grads, direct=True)


def _traced(tensors) -> bool:
    # type(), not isinstance: a DTensor parameter (tensor parallelism) is an nn.Parameter to isinstance, and its
    # op must reach DTensor's dispatch (tensor_parallel.py registers the routed ops' sharding rules there)
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or any(
        type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter for t in tensors
        if isinstance(t, torch.Tensor))


def _split_over_ranks(tensors) -> bool:
    """A DTensor beside plain tensors: a tensor-parallel weight in a graph captured on per-rank shards."""
    kinds = {type(t).__name__ == "DTensor" for t in tensors if isinstance(t, torch.Tensor)}
    return kinds == {True, False}


def eager_form(op):
    """A function with the op's signature that runs it eagerly (see the module) or, under a tracer, calls it."""
    def call(*args, **kwargs):
        if _traced((*args, *kwargs.values())):
            if _split_over_ranks((*args, *kwargs.values())):
                from sparsify.tensor_parallel import local_call
                return local_call(op, args, kwargs)
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


EAGER = {spec.op: eager_form(spec.op) for spec in SPECS if spec.direct is not None and spec.autograd is not None}


def eager_form_of(node_target, kwargs) -> object | None:
    """The eager function for a call of `node_target` with these kwargs, or None (not routed, or Triton)."""
    if direct_form(node_target, kwargs) is None:
        return None
    return EAGER[node_target]
