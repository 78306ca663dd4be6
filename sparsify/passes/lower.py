"""Lower: choose the implementation of every routed op for the device the graph runs on.

    sparsify.routed_linear(x, ids, w, b)  =>  sparsify.routed_linear(x, ids, w, b, backend="triton")

"auto" resolves to Triton on CUDA (when triton is installed) and to the torch
reference elsewhere; "triton" forces the kernels (on CPU under TRITON_INTERPRET=1),
"torch" forces the reference. The graph is captured per device, so the choice
is made once here rather than on every call.
"""
from __future__ import annotations

import torch
import torch.fx

from sparsify import ops  # noqa: F401  (registers every routed op and its spec)
from sparsify.ops.backend import use_triton
from sparsify.ops.spec import lowered_ops
from sparsify.errors import PassCheckError, describe_node
from sparsify.passes import PassBase, PassResult
from sparsify.passes.route import require_routed

ROUTED_OPS = lowered_ops()  # the routed ops with a Triton implementation (their specs say `lowered`)


class LowerPass(PassBase):
    name = "lower"

    def __init__(self, *, backend: str, device):
        self.backend, self.device = backend, device
        self.chosen = "triton" if use_triton(backend, device) else "torch"

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        require_routed(graph_module, self.name)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        changed = False
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target in ROUTED_OPS and node.kwargs.get("backend") != self.chosen:
                node.update_kwarg("backend", self.chosen)
                changed = True
        if changed:
            graph_module.recompile()
        return PassResult(graph_module, changed)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        graph_module.graph.lint()
        unlowered = [describe_node(n) for n in graph_module.graph.nodes
                     if n.op == "call_function" and n.target in ROUTED_OPS and n.kwargs.get("backend") != self.chosen]
        if unlowered:
            raise PassCheckError(f"pass 'lower' left routed ops without the {self.chosen!r} backend: {unlowered[:3]}")


def lower(graph_module: torch.fx.GraphModule, *, backend: str, device) -> PassResult:
    """LowerPass(backend=..., device=...)(graph_module)."""
    return LowerPass(backend=backend, device=device)(graph_module)
