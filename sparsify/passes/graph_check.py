"""Self-check of a rewriting pass: the graph it leaves must lint and propagate fake tensors to the
shapes and dtypes it had before, except where the pass says values change.

    snapshot = snapshot_values(gm); <pass rewrites gm>; check_graph(gm, "route", snapshot, may_change={...})

A pass's `requires` takes the snapshot and its `ensures` runs the check, so a bad
rewrite is reported by the pass that made it, naming the node and the model's
source line, instead of surfacing later as a raw error in a kernel or in
torch.export.unflatten. The propagation runs in the capture's FakeTensorMode
(symbolic sizes stay symbolic), and every value the pass created or reshaped gets
its fake value in node.meta["val"], as export leaves every node.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sparsify.errors import PassCheckError, cut_message, describe_node, graph_excerpt, node_named_in


def snapshot_values(graph_module: torch.fx.GraphModule) -> dict[torch.fx.Node, Any]:
    return {node: node.meta["val"] for node in graph_module.graph.nodes if "val" in node.meta}


def _same(before, after) -> bool:
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        return len(before) == len(after) and all(_same(b, a) for b, a in zip(before, after))
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        return (before.dtype == after.dtype and before.dim() == after.dim()
                and all(statically_known_true(b == a) for b, a in zip(before.shape, after.shape)))
    if isinstance(before, torch.SymInt) or isinstance(after, torch.SymInt):
        return statically_known_true(before == after)
    return type(before) is type(after)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return repr(value)


class _CheckingPropagation(FakeTensorProp):
    """Re-runs, on fake tensors, every node the pass created or reshaped and every node one of whose inputs
    changed value; a node whose inputs all kept their values keeps export's value unrun (some ops export
    recorded, e.g. aten.pad with a symbolic padding, cannot be re-run on fake tensors, and need not be).
    A routed op that replaced a dense node must compute that node's shape and dtype."""

    def __init__(self, graph_module, mode, pass_name: str, before: dict, may_change: set):
        super().__init__(graph_module, mode)
        self.pass_name, self.before, self.may_change = pass_name, before, may_change
        self.changed: set[torch.fx.Node] = set()
        self.before_by_name = {node.name: value for node, value in before.items()}

    def run_node(self, node: torch.fx.Node):
        old = self.before.get(node)
        new_or_reshaped = old is None or node in self.may_change
        if node.op == "placeholder":
            if new_or_reshaped:
                self.changed.add(node)
            return super().run_node(node)
        if not new_or_reshaped and not any(i in self.changed for i in node.all_input_nodes):
            return old
        try:
            result = super().run_node(node)
        except Exception as e:  # any failure here is the pass's bug: say where
            raise PassCheckError(
                f"pass '{self.pass_name}' left an invalid graph: {describe_node(node)} fails on fake tensors: "
                f"{type(e).__name__}: {str(e).strip()[:600]}") from e
        replaced = self.before_by_name.get(node.meta.get("sparsify_dense_node")) if old is None else None
        if replaced is not None:
            # A routed op must compute the value of the dense node it replaced; then its users see no change.
            if not _same(replaced, node.meta.get("val")):
                raise PassCheckError(
                    f"pass '{self.pass_name}' replaced node '{node.meta['sparsify_dense_node']}' by "
                    f"{describe_node(node)}, which computes {_describe(node.meta.get('val'))} instead of "
                    f"{_describe(replaced)}")
        elif new_or_reshaped or free_unbacked_symbols(old):
            self.changed.add(node)
        elif not _same(old, node.meta.get("val")):
            raise PassCheckError(
                f"pass '{self.pass_name}' changed the value of {describe_node(node)}: it was "
                f"{_describe(old)} before the pass and is {_describe(node.meta.get('val'))} after")
        else:
            node.meta["val"] = old  # unchanged: keep export's value (and its identity)
        return result


def check_graph(graph_module: torch.fx.GraphModule, pass_name: str, before: dict,
                may_change: set = frozenset()) -> None:
    """Lint, then propagate fake tensors from the placeholders' values (set them for new or reshaped
    placeholders first) and compare each node with its value in `before`."""
    graph = graph_module.graph
    try:
        graph.lint()
    except Exception as e:
        node = node_named_in(graph, str(e))
        around = f"\ngraph around {describe_node(node)}:\n{graph_excerpt(node)}" if node is not None else ""
        raise PassCheckError(f"pass '{pass_name}' left a malformed graph: {type(e).__name__}: {cut_message(e)}"
                             + around) from e
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    missing = [n.name for n in placeholders if "val" not in n.meta]
    if missing:
        raise PassCheckError(f"pass '{pass_name}' added placeholders without example values: {missing}")
    values = [n.meta["val"] for n in placeholders]
    mode = detect_fake_mode(values)
    if mode is None:  # a graph not from export (no fake values): nothing to propagate in
        return
    _CheckingPropagation(graph_module, mode, pass_name, before, set(may_change)).propagate_dont_convert_inputs(
        *values)
