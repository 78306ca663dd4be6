"""Errors sparsify raises, and the one place that says where a graph node came from."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
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


class InternalError(SparsifyError):
    """Something failed inside sparsify where it should not (a bug, or a model form no pass handles): the
    message names the pass or entry point, the node and the model's source line where known, and quotes
    only the few graph nodes around the failure."""


class PassOrderError(PassCheckError):
    """A pass was run on a graph its predecessors have not prepared (or have already lowered): see
    sparsify/passes/pipeline.py for the order."""


class VerificationError(SparsifyError):
    """The routed model does not match the dense one; `.report` holds the comparison."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def module_fqn(node: torch.fx.Node) -> str:
    """FQN of the innermost module whose forward created `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


TORCH_DIR = str(Path(torch.__file__).parent)


def source_line(node: torch.fx.Node) -> str:
    """The model's own source line that created `node`: the last frame of its stack trace outside torch
    (an nn.Linear's frame in torch/nn/modules says nothing about the model)."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(i, line.strip()) for i, line in enumerate(trace) if line.strip().startswith("File ")]
    if not frames:
        return "<unknown source>"
    index, frame = next(((i, f) for i, f in reversed(frames) if TORCH_DIR not in f), frames[-1])
    code_line = trace[index + 1].strip() if index + 1 < len(trace) else ""
    return f"{frame}: {code_line}" if code_line and not code_line.startswith("File ") else frame


def describe_node(node: torch.fx.Node) -> str:
    return f"node '{node.name}' ({node.target}) in module '{module_fqn(node) or '<root>'}' at {source_line(node)}"


MESSAGE_LIMIT = 600


def cut_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """An exception's message without the whole graph torch.fx appends to some (lint, codegen errors)."""
    text = str(text).split("\ngraph():")[0].strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def node_named_in(graph: torch.fx.Graph, text: str) -> torch.fx.Node | None:
    """The first node of `graph` that a message names (torch.fx quotes node names, 'linear_3', or prints
    them as %linear_3)."""
    nodes = {node.name: node for node in graph.nodes}
    for quoted, printed in re.findall(r"'([A-Za-z_]\w*)'|%([A-Za-z_]\w*)", str(text)):
        if (quoted or printed) in nodes:
            return nodes[quoted or printed]
    return None


def graph_excerpt(node: torch.fx.Node, radius: int = 3) -> str:
    """The nodes around `node` in its graph, one line each, the node itself marked."""
    nodes = list(node.graph.nodes)
    at = nodes.index(node)
    lines = []
    for other in nodes[max(0, at - radius): at + radius + 1]:
        line = other.format_node() or other.name
        lines.append(("  >> " if other is node else "     ") + cut_message(line, 200))
    return "\n".join(lines)


def internal_error(where: str, error: Exception, graph: torch.fx.Graph | None = None) -> InternalError:
    """An InternalError for `error` raised in `where`, located at the node it names (or `error.sparsify_node`)."""
    node = getattr(error, "sparsify_node", None)
    if node is None and graph is not None:
        node = node_named_in(graph, str(error))
    message = f"{where} failed"
    if node is not None and node.graph is not None and node in node.graph.nodes:
        message += f" at {describe_node(node)}"
    message += f": {type(error).__name__}: {cut_message(error)}"
    if node is not None and node.graph is not None and node in node.graph.nodes:
        message += "\ngraph around it:\n" + graph_excerpt(node)
    message += ("\nThis is a bug in sparsify or a model form it does not handle yet: please report this message; "
                "meanwhile exclude=<regex> can keep the parameters of that module shared.")
    return InternalError(message)


def reported(what: str):
    """For the public entry points (convert, save, load, verify): every failure reaches the caller as a
    SparsifyError saying what failed, never as a raw exception from deep inside. An OSError (disk full,
    permissions) says so with its path; anything else is an InternalError."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SparsifyError:
                raise
            except OSError as e:
                raise SparsifyError(f"{what} failed: {type(e).__name__}: {cut_message(e)}; check the path, its "
                                    "permissions and the free space") from e
            except Exception as e:
                raise internal_error(what, e) from e
        return wrapper
    return decorate
