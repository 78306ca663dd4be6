"""Graph passes, in torch.fx's pass style (torch/fx/passes/infra): a pass object takes its configuration
in the constructor, `requires` checks its precondition, `call` rewrites, `ensures` checks the result;
calling it runs the three and returns PassResult(graph_module, modified). Analyses are functions.

capture (canonicalize) -> plan (norm patterns, token provenance, param uses) -> route -> lower -> verify.
`run_passes` names the failing pass and the passes that ran before it, as torch.fx's PassManager does;
a SparsifyError keeps its type, any other error becomes an InternalError naming the node it failed at
with the few graph nodes around it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from sparsify.errors import SparsifyError, internal_error

__all__ = ["PassBase", "PassResult", "node_value", "run_passes"]


def node_value(node):
    """The example (fake) value export recorded for a graph value: node.meta["val"], None for a literal."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence[Callable[[torch.fx.GraphModule], PassResult]]):
    done: list[str] = []
    for graph_pass in passes:
        name = getattr(graph_pass, "name", None) or getattr(graph_pass, "__name__", type(graph_pass).__name__)
        try:
            graph_module = graph_pass(graph_module).graph_module
        except SparsifyError as e:
            e.add_note(f"sparsify: pass '{name}' failed (after: {', '.join(done) or 'none'})")
            raise
        except Exception as e:
            raise internal_error(f"pass '{name}' (after: {', '.join(done) or 'none'})", e, graph_module.graph) from e
        done.append(name)
    return graph_module
