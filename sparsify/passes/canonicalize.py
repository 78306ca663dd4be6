"""Canonicalize a captured graph, so that one pattern matches what models spell many ways.

    _assert_tensor_metadata(h, dtype=f32); to(h, f32)   =>  to(h, f32)
    sub(x, mean); ...; sub(x, mean)                     =>  sub(x, mean) used twice
    type_as(x, y)                                       =>  to(x, y.dtype), or x where the dtypes agree
    mul(reciprocal(s), 1)                               =>  reciprocal(s)      (`1 / s` as export spells it)

Export keeps a dtype assert beside every `.to()` and does not merge a value the
model computes twice (`(x - mu) / sqrt(((x - mu) ** 2).mean())`). Both hide a
norm from pattern matching: an assert is a user outside the pattern, and a
recomputed value is a second node where the pattern has one. `x.type_as(y)` is
a cast spelled with a second tensor: the norm patterns know casts as `.to()`, and a parameter passed as
`y` only gives its dtype, which is no use to route. A float times the literal 1 is itself (bitwise), and
export writes `1 / s` and `1.0 / s` as reciprocal(s) times 1 or 1.0, two literals a pattern tells apart. None of these changes a number, so the graph both the
dense and the routed model run is canonical.

Duplicates are merged only within one module (torch.fx's CSEPass would merge
across modules, and the routed graph is split per module later), only for pure
ATen ops, and not at all in a graph that mutates a tensor in place (a value read
before and after a mutation is not the same value).
"""
from __future__ import annotations

import torch
import torch.fx

from sparsify.passes import PassResult

aten = torch.ops.aten
METADATA_ASSERTS = {aten._assert_tensor_metadata.default}  # dtype/device checks export adds beside `.to()`


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _mergeable(node: torch.fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and not node.is_impure()
            and torch.Tag.nondeterministic_seeded not in target.tags)


def _key(node: torch.fx.Node):
    name = lambda n: f"%{n.name}"  # noqa: E731  (names are unique within a graph)
    scope = tuple((node.meta.get("nn_module_stack") or {}).keys())
    return (node.target, repr(torch.fx.node.map_arg(node.args, name)),
            repr(torch.fx.node.map_arg(dict(node.kwargs), name)), scope)


def _type_as_to_cast(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """Rewrite `type_as(x, y)` as `_to_copy(x, dtype=y.dtype)`, or drop it where x has y's dtype already
    (type_as returns the tensor x itself then, so every use of it is a use of x, mutations included)."""
    x, other = node.args[0], node.args[1]
    x_val, other_val = x.meta.get("val"), other.meta.get("val")
    if not isinstance(x_val, torch.Tensor) or not isinstance(other_val, torch.Tensor) or x_val.device != other_val.device:
        return False
    if x_val.dtype == other_val.dtype:
        node.replace_all_uses_with(x)
    else:
        with graph.inserting_before(node):
            cast = graph.call_function(aten._to_copy.default, (x,), {"dtype": other_val.dtype})
        cast.meta.update(node.meta)
        node.replace_all_uses_with(cast)
    graph.erase_node(node)
    return True


def _is_times_one(node: torch.fx.Node) -> bool:
    """`x * 1` of a float tensor x whose result has x's dtype and shape: x itself, to the bit."""
    if node.target != aten.mul.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    x, one = node.args
    if not isinstance(x, torch.fx.Node) or isinstance(one, bool) or one != 1 or not isinstance(one, (int, float)):
        return False
    x_val, out_val = x.meta.get("val"), node.meta.get("val")
    return (isinstance(x_val, torch.Tensor) and isinstance(out_val, torch.Tensor) and x_val.is_floating_point()
            and x_val.dtype == out_val.dtype and x_val.shape == out_val.shape)


def canonicalize(graph_module: torch.fx.GraphModule) -> PassResult:
    graph = graph_module.graph
    changed = False
    mutating = any(_mutates(n) for n in graph.nodes if n.op == "call_function")
    for node in list(graph.nodes):
        if node.target in METADATA_ASSERTS:
            graph.erase_node(node)
            changed = True
        elif node.target == aten.type_as.default:
            changed |= _type_as_to_cast(graph, node)
        elif _is_times_one(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if not mutating:
        seen: dict = {}
        for node in list(graph.nodes):
            if not _mergeable(node):
                continue
            key = _key(node)
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
                changed = True
            else:
                seen[key] = node
    if changed:
        graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, changed)
