"""Simplify: fewer ATen calls in a graph that is only ever run eagerly (a decoding step).

    transpose(transpose(x, 1, 2), -1, -2)                  =>  x
    expand(unsqueeze(ids, 1), [-1, sym_size(h, 1)])  x 12  =>  expand(unsqueeze(ids, 1), [-1, 1])  x 1

Every node of an eagerly run graph is a Python call into the dispatcher (a few microseconds each), and a small
model's decoding step is a few hundred of them (HF Mamba's: ~300), many of them views that export writes out
or layouts of the modality ids that the route pass adds per routed op. Each rule is exact for every input the
graph accepts:
- static sizes: `sym_size` of a dim the capture fixed is that int;
- no-op views: a view / reshape / expand to its input's shape, a full slice, a transpose or squeeze the next
  op undoes;
- no-op casts: `to` a dtype (layout, device) the value has, as the graph was captured for those;
- common subexpressions: a pure op repeated on the same arguments, unless something it reads was mutated
  in between (the cache updates of a decoding step are in-place ops inside the graph).
torch.fx's own CSE pass (passes/dialect/common/cse_pass.py) is not used: it only skips impure nodes, and would
merge a read of a cache buffer before its in-place update with one after it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from sparsify.passes import PassBase, PassResult, node_value
from sparsify.passes.token_provenance import size_expr

aten = torch.ops.aten
SAME_SHAPE_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                    aten.alias.default}
INVERSES = {(aten.squeeze.dim, aten.unsqueeze.default), (aten.unsqueeze.default, aten.squeeze.dim)}


def _same_shape(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(size_expr(x) == size_expr(y) for x, y in zip(a.shape, b.shape)))


def _identity_of(node: torch.fx.Node):
    """The node this one's value equals (same values, same layout), or None."""
    target, args = node.target, node.args
    source = args[0] if args else None
    if not isinstance(source, torch.fx.Node):
        return None
    out, src = node_value(node), node_value(source)
    if target in SAME_SHAPE_VIEWS and _same_shape(out, src):
        return source
    if target == aten.slice.Tensor and (args[4] if len(args) > 4 else node.kwargs.get("step", 1)) == 1 \
            and _same_shape(out, src):
        return source
    if target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device) and isinstance(src, torch.Tensor):
        return source if _no_op_cast(node, src) else None
    if not (isinstance(src, torch.Tensor) and source.op == "call_function" and source.args
            and isinstance(source.args[0], torch.fx.Node)):
        return None
    inner = source.args[0]
    if target == aten.transpose.int and source.target == aten.transpose.int:
        rank = src.dim()
        if {d % rank for d in args[1:3]} == {d % rank for d in source.args[1:3]}:
            return inner
    if (source.target, target) in INVERSES and _same_shape(out, node_value(inner)):
        rank = max(out.dim(), src.dim())  # both dims index the tensor with the extra dim
        if args[1] % rank == source.args[1] % rank:
            return inner
    return None


def _no_op_cast(node: torch.fx.Node, src: torch.Tensor) -> bool:
    """`to` that returns its input itself: no copy asked, and dtype, layout, device already what it asks."""
    kwargs = dict(node.kwargs)
    if node.target == aten.to.dtype:
        wanted = {"dtype": node.args[1]}
        extra = node.args[2:]
    elif node.target == aten.to.device:
        wanted = {"device": node.args[1], "dtype": node.args[2]}
        extra = node.args[3:]
    else:
        wanted = {key: kwargs.pop(key, None) for key in ("dtype", "layout", "device", "pin_memory")}
        extra = node.args[1:]
    if any(extra) or kwargs.pop("copy", False) or kwargs.pop("memory_format", None) is not None:
        return False
    kwargs.pop("non_blocking", None)
    if kwargs:  # an argument this rule does not know
        return False
    dtype, layout, device = wanted.get("dtype"), wanted.get("layout"), wanted.get("device")
    return ((dtype is None or dtype == src.dtype) and (layout is None or layout == src.layout)
            and (device is None or torch.device(device) == src.device) and not wanted.get("pin_memory"))


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    hash(value)  # raises TypeError for what cannot be a key
    return value


def _schema(node: torch.fx.Node):
    return node.target._schema if isinstance(node.target, torch._ops.OpOverload) else None


def _bound_args(node: torch.fx.Node, schema) -> list[tuple[object, object]]:
    """(schema argument, value) pairs of a call."""
    pairs = []
    for index, argument in enumerate(schema.arguments):
        if argument.kwarg_only or index >= len(node.args):
            if argument.name in node.kwargs:
                pairs.append((argument, node.kwargs[argument.name]))
        else:
            pairs.append((argument, node.args[index]))
    return pairs


def _nodes_in(value) -> list[torch.fx.Node]:
    nodes = []
    torch.fx.node.map_arg(value, nodes.append)
    return nodes


class SimplifyPass(PassBase):
    name = "simplify"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        changed = self._static_sizes(graph)
        changed |= self._identities(graph)
        changed |= self._common_subexpressions(graph)
        if changed:
            graph.eliminate_dead_code()
            graph_module.recompile()
        return PassResult(graph_module, changed)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        graph_module.graph.lint()

    @staticmethod
    def _static_sizes(graph: torch.fx.Graph) -> bool:
        changed = False
        for node in list(graph.nodes):
            value = node.meta.get("val")
            if node.target == aten.sym_size.int and type(value) is int:
                for user in list(node.users):
                    user.args = torch.fx.node.map_arg(user.args, lambda n: value if n is node else n)
                    user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
                changed = True
        return changed

    @staticmethod
    def _identities(graph: torch.fx.Graph) -> bool:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or not node.users:
                continue
            same = _identity_of(node)
            if same is not None:
                node.replace_all_uses_with(same)
                changed = True
        return changed

    @staticmethod
    def _common_subexpressions(graph: torch.fx.Graph) -> bool:
        storage: dict[torch.fx.Node, frozenset] = {}  # node -> the nodes whose memory its value lives in
        reads: dict[object, frozenset] = {}           # table key -> storages its node read
        table: dict[object, torch.fx.Node] = {}
        changed = False
        for node in list(graph.nodes):
            inputs = _nodes_in((node.args, node.kwargs))
            schema = _schema(node)
            if node.op != "call_function":  # a placeholder's memory is its own; get_attr nodes of one buffer share it
                storage[node] = frozenset([node.target if node.op == "get_attr" else node])
                continue
            read = frozenset().union(*(storage.get(n, frozenset([n])) for n in inputs))
            written = None
            if schema is not None:
                written = [v for arg, v in _bound_args(node, schema) if arg.alias_info and arg.alias_info.is_write]
            mutates = bool(written) or (schema is None and node.target is not operator.getitem and node.is_impure())
            if mutates:
                # Anything computed from what this writes is stale from here on.
                hit = read if written is None else \
                    frozenset().union(*(storage.get(n, frozenset([n])) for n in _nodes_in(written)))
                for key in [k for k, r in reads.items() if r & hit]:
                    del table[key], reads[key]
            aliases = node.target is operator.getitem or (
                schema is not None and any(r.alias_info is not None for r in schema.returns))
            storage[node] = read if aliases else frozenset([node])
            pure = node.target is operator.getitem or (
                schema is not None and not mutates and torch.Tag.nondeterministic_seeded not in node.target.tags
                and not schema.is_mutable)
            if not pure:
                continue
            try:
                key = (node.target, _hashable(node.args), _hashable(dict(node.kwargs)))
            except TypeError:
                continue
            if key in table:
                node.replace_all_uses_with(table[key])
                storage[node] = storage[table[key]]
                changed = True
            else:
                # its own memory too: a later write to it (fill_ of an empty) makes it stale
                table[key], reads[key] = node, read | storage[node]
        return changed


def simplify(graph_module: torch.fx.GraphModule) -> PassResult:
    """SimplifyPass()(graph_module): in place."""
    return SimplifyPass()(graph_module)
