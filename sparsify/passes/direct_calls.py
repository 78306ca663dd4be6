"""Direct calls: a copy of a routed graph whose torch-backend routed ops call their Python implementations.

    sparsify.routed_linear(x, ids, w, b, backend="torch")  =>  routed_linear_ref(x, ids, w, b)
    sparsify.routed_gather(w, ids)                          =>  routed_gather_ref(w, ids)

A custom op call costs 30-50 us of dispatch on CPU before any work: a third of a small model's decoding step.
A graph that is only ever run eagerly (a decoding step: never exported, traced or unflattened) calls the
references directly (ops/eager.py), under generate's no_grad: they are plain PyTorch, but their CPU paths
write into reused scratch buffers (out=), which autograd refuses. Triton-lowered ops keep the custom op (their
backward is the op's own).
"""
from __future__ import annotations

import copy

import torch
import torch.fx

from sparsify.ops.eager import direct_form, eager_form_of
from sparsify.passes.simplify import simplify


# Functional updates export writes for a buffer's in-place update, and their in-place forms.
IN_PLACE = {torch.ops.aten.index_copy.default: torch.ops.aten.index_copy_.default,
            torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default}


def direct_calls(graph_module: torch.fx.GraphModule, mutated_buffers: int = 0,
                 split_over_ranks: bool = False) -> torch.fx.GraphModule:
    """A copy of `graph_module` (left as it is), simplified (passes/simplify.py), with each torch-backend routed
    op called directly, and the buffer updates (the first `mutated_buffers` outputs) written in place where
    that is safe. `split_over_ranks`: the model's routed linears are split over tensor-parallel ranks
    (tensor_parallel.py), so the ops are called in their eager forms, which hand a split weight to DTensor."""
    graph_module = simplify(copy.deepcopy(graph_module)).graph_module
    form_of = eager_form_of if split_over_ranks else direct_form
    for node in graph_module.graph.nodes:
        direct = form_of(node.target, node.kwargs) if node.op == "call_function" else None
        if direct is not None:
            node.target = direct
    _update_buffers_in_place(graph_module.graph, mutated_buffers)
    graph_module.recompile()
    return graph_module


def _update_buffers_in_place(graph: torch.fx.Graph, mutated_buffers: int) -> None:
    """Export returns a cache update (`keys.index_copy_(2, positions, new)`) as a new full tensor the caller
    copies back: two copies of the whole cache per step. Where the old buffer has no other reader, the
    update is made in place (the caller then finds the buffer already holds its new value)."""
    outputs = list(graph.output_node().args[0])[:mutated_buffers]
    for updated in outputs:
        if not (isinstance(updated, torch.fx.Node) and updated.target in IN_PLACE):
            continue
        buffer = updated.args[0]
        if isinstance(buffer, torch.fx.Node) and buffer.op == "placeholder" and set(buffer.users) == {updated}:
            updated.target = IN_PLACE[updated.target]
