"""Graph passes. Each is a function GraphModule -> PassResult(graph_module, changed).

capture -> plan -> route -> verify; `run_passes` names the failing pass and the
passes that ran before it, as torch.fx's PassManager does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    changed: bool


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence[Callable[[torch.fx.GraphModule], PassResult]]):
    done: list[str] = []
    for graph_pass in passes:
        name = getattr(graph_pass, "__name__", repr(graph_pass))
        try:
            graph_module = graph_pass(graph_module).graph_module
        except Exception as e:
            e.add_note(f"sparsify: pass '{name}' failed (after: {', '.join(done) or 'none'})")
            raise
        done.append(name)
    return graph_module
