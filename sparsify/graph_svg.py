"""Draw a routed graph: networkx for the graph and its layout, matplotlib for the picture (SVG, PNG or PDF).

Each op of the routed graph is a node; edges follow data. Ops are grouped in columns by the repeated block
that made them (layers.0, layers.1, ...; the rest in a first column), in graph order down each column.
Routed ops (the ops that replaced a dense use of a parameter) are red and labelled with the parameters they
read, the token permutations of the hoist pass blue, the rest grey; the title counts each kind.
"""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch
import torch.fx

from sparsify.errors import SparsifyError
from sparsify.ops.spec import spec_of
from sparsify.plan import _block_of

FORMATS = (".svg", ".png", ".pdf")
# Ops between a parameter's placeholder and the routed op that reads it (route transposes a stacked weight).
_VIEWS = {torch.ops.aten.transpose.int, torch.ops.aten.t.default, torch.ops.aten.view.default,
          torch.ops.aten.reshape.default, torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default}


def _block(node: torch.fx.Node) -> str:
    """The repeated block whose forward made the node, as the plan names blocks ('' outside any)."""
    for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
        block = _block_of(fqn + ".x")  # _block_of takes a parameter FQN: the module's FQN plus a name
        if block:
            return block
    return ""


def _kind(node: torch.fx.Node) -> str:
    spec = spec_of(node.target)
    if spec is None:
        return "other"
    return "routed" if spec.uses else "permutation"


def _parameters_read(node: torch.fx.Node, fqns: dict[str, str]) -> list[str]:
    """FQNs of the parameters a routed op reads, directly or through a view route put in between."""
    found = []
    for source in node.all_input_nodes:
        while source.op == "call_function" and source.target in _VIEWS:
            source = source.args[0]
        if source.op == "placeholder" and source.name in fqns:
            found.append(fqns[source.name])
    return found


def _label(node: torch.fx.Node, block: str, fqns: dict[str, str]) -> str:
    op = node.target.name().split("::")[-1].split(".")[0]
    params = _parameters_read(node, fqns)
    if not params:
        return op
    # the module path inside the block once, then the parameter names: "self_attn.q_proj weight+bias"
    inside = [p[len(block) + 1:] if block and p.startswith(block + ".") else p for p in params]
    module = inside[0].rpartition(".")[0]
    names = "+".join(p.rpartition(".")[2] for p in inside if p.rpartition(".")[0] == module)
    return f"{module} {names} ({op})" if module else f"{names} ({op})"


def routed_digraph(graph_module: torch.fx.GraphModule, fqns: dict[str, str] | None = None) -> nx.DiGraph:
    """The ops of the graph as a networkx DiGraph: each node's op, block, kind (routed / permutation / other)
    and label (a routed op's parameters); `fqns` maps placeholder names to parameter FQNs."""
    graph = nx.DiGraph()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        kind, block = _kind(node), _block(node)
        label = _label(node, block, fqns or {}) if kind == "routed" else ""
        graph.add_node(node.name, op=getattr(node.target, "__name__", str(node.target)), block=block, kind=kind,
                       label=label)
        for source in node.all_input_nodes:
            if source.op == "call_function":
                graph.add_edge(source.name, node.name)
    return graph


def parameter_names(captured) -> dict[str, str]:
    """{placeholder name: parameter FQN} of a CapturedGraph."""
    nodes = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    return {node.name: target for node, (kind, target) in zip(nodes, captured.placeholders) if kind == "parameter"}


def draw(captured, path) -> Path:
    """Write a picture of a routed graph (a CapturedGraph, or a bare GraphModule: labels then without parameter
    names) as SVG, PNG or PDF by the path's suffix; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise SparsifyError(f"--graph writes {', '.join(FORMATS)} files; got {path.name!r}")
    if isinstance(captured, torch.fx.GraphModule):
        graph = routed_digraph(captured)
    else:
        graph = routed_digraph(captured.graph_module, parameter_names(captured))
    blocks = list(dict.fromkeys(data["block"] for _, data in graph.nodes(data=True)))
    row_in_block: dict[str, int] = {}
    position = {}
    for name, data in graph.nodes(data=True):  # insertion order is graph order
        row = row_in_block.get(data["block"], 0)
        row_in_block[data["block"]] = row + 1
        position[name] = (blocks.index(data["block"]), -row)
    height = max(row_in_block.values(), default=1)
    by_kind = {kind: [n for n, d in graph.nodes(data=True) if d["kind"] == kind]
               for kind in ("routed", "permutation", "other")}
    longest = max((len(graph.nodes[n]["label"]) for n in by_kind["routed"]), default=10)
    column = 1.0 + 0.055 * longest  # inches: a column holds its nodes and their labels, so none is clipped
    figure, axis = plt.subplots(figsize=(1.0 + column * len(blocks), 2.2 + 0.13 * height))
    nx.draw_networkx_edges(graph, position, ax=axis, alpha=0.15, arrows=False, width=0.5)
    nx.draw_networkx_nodes(graph, position, nodelist=by_kind["other"], node_size=8, node_color="0.6", ax=axis)
    nx.draw_networkx_nodes(graph, position, nodelist=by_kind["permutation"], node_size=25, node_color="tab:blue",
                           ax=axis)
    nx.draw_networkx_nodes(graph, position, nodelist=by_kind["routed"], node_size=40, node_color="tab:red", ax=axis)
    for name in by_kind["routed"]:
        x, y = position[name]
        axis.text(x + 0.04, y, graph.nodes[name]["label"], fontsize=6, va="center", ha="left")
    axis.set_xlim(-0.15, len(blocks) - 0.1)
    axis.set_ylim(-height, 1.0)  # room above the first row: no label meets the title
    axis.set_xticks(range(len(blocks)), [b or "(outside blocks)" for b in blocks], rotation=30, ha="right",
                    fontsize=7)
    axis.tick_params(labelbottom=True, bottom=True)  # networkx's drawing turned the tick labels off
    axis.set_yticks([])
    axis.set_title(f"routed graph: {len(by_kind['routed'])} routed ops (red), {len(by_kind['permutation'])} token "
                   f"permutations of the hoist pass (blue), {len(by_kind['other'])} other ops (grey)", fontsize=9)
    figure.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # labels stay text: searchable, selectable
        figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
