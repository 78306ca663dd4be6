"""Graph passes, in torch.fx's pass style (torch/fx/passes/infra): a pass object takes its configuration
in the constructor, `requires` checks its precondition, `call` rewrites, `ensures` checks the result;
calling it runs the three and returns PassResult(graph_module, modified). Analyses are functions.

capture (canonicalize) -> plan (norm patterns, token provenance, param uses) -> route -> lower -> verify.
`run_passes` names the failing pass and the passes that ran before it, as torch.fx's PassManager does,
and keeps the error's type (a SparsifyError stays one).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["PassBase", "PassResult", "run_passes"]


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence[Callable[[torch.fx.GraphModule], PassResult]]):
    done: list[str] = []
    for graph_pass in passes:
        name = getattr(graph_pass, "name", None) or getattr(graph_pass, "__name__", type(graph_pass).__name__)
        try:
            graph_module = graph_pass(graph_module).graph_module
        except Exception as e:
            e.add_note(f"sparsify: pass '{name}' failed (after: {', '.join(done) or 'none'})")
            raise
        done.append(name)
    return graph_module
