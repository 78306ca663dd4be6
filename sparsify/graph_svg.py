"""Draw a routed graph: networkx for the graph and its layout, matplotlib for the SVG.

Each op of the routed graph is a node; edges follow data. Ops are grouped in columns by the repeated block
that made them (layers.0, layers.1, ...; the rest in a first column), in graph order down each column.
Routed ops (sparsify::*) are drawn red and labelled; the rest grey.
"""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch.fx

from sparsify.errors import SparsifyError
from sparsify.plan import _block_of


def _block(node: torch.fx.Node) -> str:
    """The repeated block whose forward made the node, as the plan names blocks ('' outside any)."""
    for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
        block = _block_of(fqn + ".x")  # _block_of takes a parameter FQN: the module's FQN plus a name
        if block:
            return block
    return ""


def routed_digraph(graph_module: torch.fx.GraphModule) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        graph.add_node(node.name, op=name, block=_block(node), routed=str(node.target).startswith("sparsify."))
        for source in node.all_input_nodes:
            if source.op == "call_function":
                graph.add_edge(source.name, node.name)
    return graph


def draw(graph_module: torch.fx.GraphModule, path) -> Path:
    """Write an SVG of the routed graph; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix != ".svg":
        raise SparsifyError(f"--graph writes an .svg file; got {path.name!r}")
    graph = routed_digraph(graph_module)
    blocks = list(dict.fromkeys(data["block"] for _, data in graph.nodes(data=True)))
    row_in_block: dict[str, int] = {}
    position = {}
    for name, data in graph.nodes(data=True):  # insertion order is graph order
        row = row_in_block.get(data["block"], 0)
        row_in_block[data["block"]] = row + 1
        position[name] = (blocks.index(data["block"]), -row)
    height = max(row_in_block.values(), default=1)
    figure, axis = plt.subplots(figsize=(3 + 2.5 * len(blocks), 2 + 0.12 * height))
    routed = [n for n, d in graph.nodes(data=True) if d["routed"]]
    others = [n for n in graph.nodes if n not in set(routed)]
    nx.draw_networkx_edges(graph, position, ax=axis, alpha=0.15, arrows=False, width=0.5)
    nx.draw_networkx_nodes(graph, position, nodelist=others, node_size=8, node_color="0.6", ax=axis)
    nx.draw_networkx_nodes(graph, position, nodelist=routed, node_size=40, node_color="tab:red", ax=axis)
    nx.draw_networkx_labels(graph, {n: (x + 0.05, y) for n, (x, y) in position.items() if n in set(routed)},
                            labels={n: graph.nodes[n]["op"] for n in routed}, font_size=6, horizontalalignment="left",
                            ax=axis)
    axis.set_xticks(range(len(blocks)), [b or "(outside blocks)" for b in blocks], rotation=30, fontsize=7)
    axis.tick_params(labelbottom=True, bottom=True)  # networkx's drawing turned the tick labels off
    axis.set_yticks([])
    axis.set_title(f"routed graph: {len(routed)} routed ops (red) of {graph.number_of_nodes()}")
    figure.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # labels stay text: searchable, selectable
        figure.savefig(path, format="svg")
    plt.close(figure)
    return path
