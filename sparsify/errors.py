"""Errors sparsify raises, and the one place that says where a graph node came from."""
from __future__ import annotations

import torch.fx


class SparsifyError(ValueError):
    """Bad input or a model sparsify cannot convert; the message says what and how to fix it."""


class CaptureError(SparsifyError):
    """The model could not be captured as a graph (torch.export failed)."""


class RoutingError(SparsifyError):
    """A parameter selected for routing has a use the route pass cannot rewrite."""


class PassCheckError(SparsifyError):
    """A pass left a graph that does not lint or does not compute the shapes it should (a sparsify bug,
    reported at the pass with the node and source line)."""


class VerificationError(SparsifyError):
    """The routed model does not match the dense one; `.report` holds the comparison."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def module_fqn(node: torch.fx.Node) -> str:
    """FQN of the innermost module whose forward created `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def source_line(node: torch.fx.Node) -> str:
    """The model's own source line that created `node`, as the last frame of its stack trace."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    if not frames:
        return "<unknown source>"
    code_line = trace[-1].strip()
    return f"{frames[-1]}: {code_line}" if not code_line.startswith("File ") else frames[-1]


def describe_node(node: torch.fx.Node) -> str:
    return f"node '{node.name}' ({node.target}) in module '{module_fqn(node) or '<root>'}' at {source_line(node)}"
