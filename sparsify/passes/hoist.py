"""Hoist: sort tokens by modality once per token-wise region instead of inside every routed op.

Unhoisted, each routed op on CPU gathers its rows into modality order and scatters its output back: two
copies of its activations per op. This pass finds the maximal regions of token-wise ops (each output token
depends on the same token of the inputs only: the routed linears and norms, plain linears, elementwise ops,
reductions over feature dims), and runs each region on rows already in modality order:

    order = argsort(modality_ids.flatten(), stable)        once per forward, shared by every region
    x_sorted = permute_rows(x.flatten(0, 1), order, inverse)   one per value entering a region
    routed_linear(x_sorted, sorted_ids, w) ...                  contiguous per-modality slices: no gather/scatter
    y = permute_rows(y_sorted, inverse, order).view(B, S, ...)  one per value leaving it (attention, conv, scan,
                                                                outputs, anything not token-wise)

(permute_rows: a gather whose backward is the gather by the inverse, ops/permute_rows.py.)

Regions stay inside one block (the deepest module of a node's module stack that is an item of a module
list), so a block's inputs and outputs keep token order: FSDP2 per block, checkpointing and hooks on
blocks see what the dense model gives them (hooks on modules inside a block see rows in modality order).
A region is hoisted only when it saves copies: fewer values cross its boundary than twice its routed ops.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from sparsify import ops  # noqa: F401  (registers every routed op and its spec)
from sparsify.ops.spec import token_wise_ops
from sparsify.passes import PassBase, PassResult, node_value
from sparsify.passes.graph_check import check_graph, snapshot_values
from sparsify.errors import PassOrderError, describe_node
from sparsify.passes.route import MODALITY_IDS, require_routed

aten = torch.ops.aten
sparsify_ops = torch.ops.sparsify

# Token-wise routed ops (their specs say so): tokens in x (position 0), ids at position 1.
ROUTED = token_wise_ops()
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
    aten.neg.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default,
    aten.tanh.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default, aten.pow.Tensor_Scalar,
    aten.to.dtype, aten._to_copy.default, aten.clone.default,
}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}  # (x, dims, keepdim): over feature dims only


def block_of(node: torch.fx.Node) -> str:
    """The block a node belongs to: the deepest module on its stack that is an item of a module list (its
    FQN ends in an index), else the top-level module it runs in."""
    fqns = [fqn for fqn, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for fqn in reversed(fqns):
        if fqn.split(".")[-1].isdigit():
            return fqn
    return fqns[1] if len(fqns) > 1 else ""


class HoistPass(PassBase):
    name = "hoist"

    def __init__(self):
        self._before: dict = {}
        # What was hoisted (for tests and inspection): each region with the values entering and leaving it.
        self.regions: list[set[torch.fx.Node]] = []
        self._boundaries: list[tuple[set, set]] = []

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        require_routed(graph_module, self.name)
        lowered = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in ROUTED
                   and "backend" in n.kwargs]
        if lowered:
            raise PassOrderError("pass 'hoist' runs before 'lower' (sparsify/passes/pipeline.py): this graph's "
                                 f"routed ops have a backend already ({describe_node(lowered[0])})")
        self._before = snapshot_values(graph_module)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        check_graph(graph_module, self.name, self._before, set().union(*self.regions) if self.regions else set())

    # -- which nodes are token-wise ---------------------------------------------------------------------
    def _token_major(self, value) -> bool:
        """A tensor whose leading dims are the tokens, [batch, seq, ...] as modality_ids."""
        return (isinstance(value, torch.Tensor) and value.dim() >= 2
                and all(statically_known_true(a == b) for a, b in zip(value.shape[:2], self.ids_shape)))

    def _token_free(self, value, out_rank: int) -> bool:
        """A tensor that broadcasts against the trailing (feature) dims only."""
        return not isinstance(value, torch.Tensor) or value.dim() <= out_rank - 2

    def _tokenwise(self, node: torch.fx.Node) -> bool:
        if node.op != "call_function" or not self._token_major(node_value(node)):
            return False
        rank = node_value(node).dim()
        if node.target in ROUTED or node.target == aten.linear.default:  # tokens in x only; weights are not
            x, rest = node.args[0], node.args[1:]
            if node.target in ROUTED and (not rest or rest[0] is not self.ids):
                return False
            return self._token_major(node_value(x)) and not any(
                self._token_major(node_value(a)) for a in rest if a is not self.ids)
        if node.target in REDUCTIONS:
            x, dims = node.args[0], node.args[1]
            rank_in = node_value(x).dim()
            return self._token_major(node_value(x)) and all(d % rank_in >= 2 for d in dims)
        if node.target in ELEMENTWISE:
            tensors = [node_value(a) for a in node.all_input_nodes]
            return all(self._token_major(v) and v.dim() == rank or self._token_free(v, rank) for v in tensors)
        return False

    def _restorable(self, value) -> bool:
        """Whether a region value can be viewed back to [batch, seq, ...]: at most one symbolic feature dim."""
        return sum(not isinstance(s, int) for s in node_value(value).shape[2:]) <= 1

    # -- the pass ------------------------------------------------------------------------------------------
    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        self.ids = next((n for n in graph.nodes if n.op == "placeholder" and n.name == MODALITY_IDS), None)
        if self.ids is None or node_value(self.ids) is None or node_value(self.ids).dim() != 2:
            return PassResult(graph_module, False)
        self.ids_shape = node_value(self.ids).shape
        if statically_known_true(self.ids_shape[0] == self.ids_shape[1]):
            # batch and sequence sizes that cannot be told apart: a [seq, batch, ...] tensor would pass for
            # [batch, seq, ...], and its rows would be put in the wrong order. Leave such a graph unhoisted.
            return PassResult(graph_module, False)
        blocks = {n: block_of(n) for n in graph.nodes if self._tokenwise(n)}
        links = nx.Graph()
        links.add_nodes_from(blocks)
        links.add_edges_from((a, n) for n in blocks for a in n.all_input_nodes if blocks.get(a) == blocks[n])
        for region in nx.connected_components(links):
            inputs, outputs = self._boundary(region)
            routed = sum(n.target in ROUTED for n in region)
            # worth it where it copies less than each routed op sorting its own rows (in and out) would
            if len(inputs) + len(outputs) < 2 * routed and all(self._restorable(v) for v in outputs):
                self.regions.append(region)
                self._boundaries.append((inputs, outputs))
        if not self.regions:
            return PassResult(graph_module, False)
        self._rewrite(graph)
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _boundary(self, region):
        """(token-major values the region reads from outside, region values read outside it)."""
        inputs = {a for n in region for a in n.all_input_nodes
                  if a not in region and a is not self.ids and self._token_major(node_value(a))}
        outputs = {n for n in region if any(u not in region for u in n.users)}
        return inputs, outputs

    def _rewrite(self, graph: torch.fx.Graph) -> None:
        stacks = [n.meta["nn_module_stack"] for n in graph.nodes if n.meta.get("nn_module_stack")]
        root_stack = dict(list(stacks[0].items())[:1]) if stacks else {}

        def call(target, args, stack):
            node = graph.call_function(target, args)
            node.meta["nn_module_stack"] = dict(stack)
            return node

        with graph.inserting_after(self.ids):  # shared by every region: computed once per forward
            flat_ids = call(aten.reshape.default, (self.ids, [-1]), root_stack)
        with graph.inserting_after(flat_ids):
            order = call(aten.argsort.stable, (flat_ids,), root_stack)
            order.kwargs = {"stable": True}
        with graph.inserting_after(order):
            sorted_ids = call(aten.index_select.default, (flat_ids, 0, order), root_stack)
        with graph.inserting_after(sorted_ids):
            inverse = call(aten.argsort.stable, (order,), root_stack)
            inverse.kwargs = {"stable": True}

        restored_as: dict[torch.fx.Node, torch.fx.Node] = {}  # a region output -> its token-order view
        for region, (inputs, outputs) in zip(self.regions, self._boundaries):  # found before any rewrite
            ordered = [n for n in graph.nodes if n in region]
            for source in inputs:  # into modality order, just before the region's first reader
                source = restored_as.get(source, source)  # another region's output, restored to token order
                first = next(n for n in ordered if source in n.all_input_nodes)
                stack = first.meta.get("nn_module_stack", root_stack)  # the reader's module: no module split
                with graph.inserting_before(first):
                    rows = call(aten.flatten.using_ints, (source, 0, 1), stack)
                    rows_sorted = call(sparsify_ops.permute_rows.default, (rows, order, inverse), stack)
                for n in region:
                    n.replace_input_with(source, rows_sorted)
            for n in ordered:
                n.meta["sparsify_rows_sorted"] = inverse.name  # verify puts its rows back in token order
                if n.target in ROUTED:
                    n.replace_input_with(self.ids, sorted_ids)
                elif n.target in REDUCTIONS:  # feature dims counted from the end: the same in [T, ...]
                    rank_in = node_value(n.args[0]).dim()
                    n.update_arg(1, [d % rank_in - rank_in for d in n.args[1]])
            for value in outputs:  # back to token order, just after the region computes it
                readers = [u for u in value.users if u not in region]
                features = [int(s) if isinstance(s, int) else -1 for s in node_value(value).shape[2:]]
                stack = value.meta.get("nn_module_stack", root_stack)  # the producer's: it returns token order
                with graph.inserting_after(value):
                    rows = call(sparsify_ops.permute_rows.default, (value, inverse, order), stack)
                with graph.inserting_after(rows):
                    batch = call(aten.sym_size.int, (self.ids, 0), stack)
                with graph.inserting_after(batch):
                    seq = call(aten.sym_size.int, (self.ids, 1), stack)
                with graph.inserting_after(seq):
                    restored = call(aten.view.default, (rows, [batch, seq, *features]), stack)
                for reader in readers:
                    reader.replace_input_with(value, restored)
                restored_as[value] = restored
