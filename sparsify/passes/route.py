"""Route: rewrite every use of a routed parameter into an op that picks each token's modality copy.

    linear(x, w, b)      => sparsify.routed_linear(x, ids, w_stacked, b_stacked)
    addmm(b, x, w)       => sparsify.routed_linear(x, ids, w_stacked.transpose(1, 2), b_stacked)
    w @ x                => sparsify.routed_linear(x.mT, ids, w_stacked).mT
    layer_norm(x, w, b)  => sparsify.routed_layer_norm(x, ids, w_stacked, b_stacked)
    mul(w, rmsnorm(h))   => sparsify.routed_rms_norm(h, ids, w_stacked)       (decomposed RMSNorm)
    mul(w, h)            => mul(sparsify.routed_gather(w_stacked, ids) shaped to broadcast, h)

The routed parameter's placeholder receives the stacked [M, *S] tensor at run
time; view and cast ops applied to it alone are rewritten to keep the modality
dim in front. `modality_ids` is a new placeholder after all others.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx

from sparsify import ops  # noqa: F401  (registers torch.ops.sparsify.*)
from sparsify.errors import RoutingError, describe_node
from sparsify.passes import PassResult
from sparsify.passes.param_uses import (ELEMENTWISE_KINDS, METADATA_ASSERTS, ParamUse, broadcast_param_shape,
                                        conv1d_trim_chain, find_param_uses, token_tensor_lead_dims)
from sparsify.passes.rms_norm_pattern import match_rms_norm
from sparsify.passes.token_axes import TokenAxes

aten = torch.ops.aten
sparsify_ops = torch.ops.sparsify
MODALITY_IDS = "modality_ids"


def route(
    graph_module: torch.fx.GraphModule,
    *,
    param_fqns: dict[str, str],
    routed: set[str],
    modalities: int,
    token_dims: tuple,
    user_inputs: list[str],
) -> PassResult:
    """Route the parameters named in `routed`. `param_fqns` maps parameter placeholder names to FQNs;
    `user_inputs` names the placeholders of the model's own inputs (whose token dims provenance follows)."""
    graph = graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    param_nodes = {n: param_fqns[n.name] for n in placeholders if param_fqns.get(n.name) in routed}
    if not param_nodes:
        return PassResult(graph_module, False)
    uses = find_param_uses(graph_module, param_nodes, token_dims,
                           [n for n in placeholders if n.name in set(user_inputs)])
    problems = [f"- {fqn}: {describe_node(u.node)}: {u.problem}" for fqn, us in uses.items() for u in us if u.problem]
    if problems:
        raise RoutingError(
            "these parameters were selected for routing but have uses sparsify cannot route:\n"
            + "\n".join(problems)
            + "\nLeave them shared with exclude=<regex>, or open an issue with the op named above."
        )

    with graph.inserting_after(placeholders[-1]):
        modality_ids = graph.placeholder(MODALITY_IDS)
    rewriter = _Rewriter(graph, modality_ids, modalities)
    stacked: set[torch.fx.Node] = set(param_nodes)
    uses_by_node: dict[torch.fx.Node, list[ParamUse]] = defaultdict(list)
    for node_uses in uses.values():
        for use in node_uses:
            for view in use.view_chain:
                if view not in stacked:
                    _lift_view(view)
                    stacked.add(view)
            uses_by_node[use.node].append(use)
    for node in [n for n in graph.nodes if n in uses_by_node]:  # graph order: shared id views come first
        rewriter.rewrite(node, uses_by_node[node], stacked)

    while graph.eliminate_dead_code() | _drop_orphan_asserts(graph):
        pass
    graph.lint()
    graph_module.recompile()
    return PassResult(graph_module, True)


def _drop_orphan_asserts(graph: torch.fx.Graph) -> bool:
    """Remove dtype/device asserts on values nothing else uses any more (e.g. an RMSNorm replaced by the
    fused op): dead-code elimination keeps asserts, and they would keep the whole old subgraph running."""
    changed = False
    for node in list(graph.nodes):
        if node.target in METADATA_ASSERTS and all(u.target in METADATA_ASSERTS for u in node.args[0].users):
            graph.erase_node(node)
            changed = True
    return changed


def _rank(node: torch.fx.Node) -> int:
    return node.meta["val"].dim()


def _lift_view(node: torch.fx.Node) -> None:
    """Rewrite a view/cast of a dense parameter to act on the stacked [M, *S] one."""
    source, rank = node.args[0], _rank(node.args[0])
    if node.target == aten.t.default:
        node.target, node.args = aten.transpose.int, (source, 1, 2)
    elif node.target == aten.numpy_T.default:  # w.T: every dim reversed
        node.target, node.args = aten.permute.default, (source, [0] + list(range(rank, 0, -1)))
    elif node.target == aten.mT.default:  # w.mT: the last two dims swapped
        node.target, node.args = aten.transpose.int, (source, rank - 1, rank)
    elif node.target == aten.transpose.int:
        node.args = (source, node.args[1] % rank + 1, node.args[2] % rank + 1)
    elif node.target == aten.permute.default:
        node.args = (source, [0] + [d % rank + 1 for d in node.args[1]])
    elif node.target in (aten.view.default, aten.reshape.default):
        node.args = (source, [-1] + list(node.args[1]))
    elif node.target == aten.unsqueeze.default:
        node.args = (source, node.args[1] % (rank + 1) + 1)
    elif node.target == aten.squeeze.dim:
        node.args = (source, node.args[1] % rank + 1)
    # casts, clone, contiguous, detach, alias act elementwise: unchanged


class _Rewriter:
    def __init__(self, graph: torch.fx.Graph, modality_ids: torch.fx.Node, modalities: int):
        self.graph = graph
        self.modality_ids = modality_ids
        self.modalities = modalities
        self._id_layouts: dict[tuple, torch.fx.Node] = {}
        self.layout_point = modality_ids.next  # the first node after the placeholders
        # Module stack for the nodes this pass creates: the rewritten node's (so splitting the graph per
        # module, as torch.export.unflatten does, keeps them with their module); the root's for the id
        # layouts every module shares.
        stacks = (n.meta.get("nn_module_stack") for n in graph.nodes)
        first = next((stack for stack in stacks if stack), {})
        self.root_stack = dict(list(first.items())[:1])
        self.stack = self.root_stack

    def call(self, target, *args) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        if self.stack:
            node.meta["nn_module_stack"] = dict(self.stack)
        return node

    def ids_with_tokens_in_order(self, axes: TokenAxes) -> tuple[torch.fx.Node, tuple[int, ...]]:
        """modality_ids laid out as the tensor's token dims in increasing dim order, and those dims."""
        if axes.seq_index is not None:
            key = ("position", axes.seq_index)
            make = lambda: self.call(aten.select.int, self.modality_ids, 1, axes.seq_index)  # noqa: E731
        elif axes.flat:
            key = ("flat", axes.seq_major)
            if axes.seq_major:
                make = lambda: self.call(aten.reshape.default,  # noqa: E731
                                         self.call(aten.transpose.int, self.modality_ids, 0, 1), [-1])
            else:
                make = lambda: self.call(aten.reshape.default, self.modality_ids, [-1])  # noqa: E731
        else:
            key = ("split", axes.dims[0] < axes.dims[1])
            make = (lambda: self.modality_ids) if key[1] else \
                (lambda: self.call(aten.transpose.int, self.modality_ids, 0, 1))
        if key not in self._id_layouts:
            # Made once, at the graph's start in the root's scope: a module's nodes must stay contiguous
            # for the per-module split, and every module reads these.
            stack, self.stack = self.stack, self.root_stack
            with self.graph.inserting_before(self.layout_point):
                self._id_layouts[key] = make()
            self.stack = stack
        return self._id_layouts[key], tuple(sorted(axes.dims))

    def ids_for(self, axes: TokenAxes, lead: int, tensor: torch.fx.Node | None) -> torch.fx.Node:
        """Ids shaped like the first `lead` dims of `tensor` (expanded), or broadcastable if tensor is None."""
        ids, dims = self.ids_with_tokens_in_order(axes)
        for i in range(lead):
            if i not in dims:
                ids = self.call(aten.unsqueeze.default, ids, i)
        if tensor is not None and lead > len(dims):
            sizes = [-1 if i in dims else self.call(aten.sym_size.int, tensor, i) for i in range(lead)]
            ids = self.call(aten.expand.default, ids, sizes)
        return ids

    def stacked(self, value, stacked: set) -> torch.fx.Node | None:
        """The operand as a [M, ...] tensor: routed ones already are, shared ones are broadcast (no copy)."""
        if value is None or value in stacked:
            return value
        front = self.call(aten.unsqueeze.default, value, 0)
        return self.call(aten.expand.default, front, [self.modalities] + [-1] * _rank(value))

    def rewrite(self, node: torch.fx.Node, uses: list[ParamUse], stacked: set) -> None:
        self.stack = node.meta.get("nn_module_stack") or self.root_stack
        use = uses[0]
        args = list(node.args)
        with self.graph.inserting_before(node):
            if use.kind == "norm_scale" and len(uses) == 1 and self.fuse_rms_norm(node, use, args, stacked):
                return
            if use.kind in ELEMENTWISE_KINDS:
                for u in uses:
                    node.update_arg(u.operand, self.gathered(u, args[u.operand]))
                return
            if use.kind == "scan_delta_bias":
                # softplus(delta + bias) inside the scan == the scan of (delta + per-token bias), no bias
                delta = self.call(aten.add.Tensor, args[1], self.gathered(use, args[7]))
                node.update_arg(1, delta)
                node.update_arg(7, None)
                return
            lead = token_tensor_lead_dims(use)
            if use.kind in ("linear_weight", "linear_bias"):
                x = args[0]
                bias = args[2] if len(args) > 2 else None
                new = self.call(sparsify_ops.routed_linear.default, x, self.ids_for(use.token_axes, lead, x),
                                self.stacked(args[1], stacked), self.stacked(bias, stacked))
            elif use.kind in ("addmm_weight", "addmm_bias"):
                x = args[1]
                weight = self.call(aten.transpose.int, self.stacked(args[2], stacked), 1, 2)
                new = self.call(sparsify_ops.routed_linear.default, x, self.ids_for(use.token_axes, lead, x),
                                weight, self.stacked(args[0], stacked))
            elif use.kind == "matmul_weight_right":
                x = args[0]
                weight = self.call(aten.transpose.int, self.stacked(args[1], stacked), 1, 2)
                new = self.call(sparsify_ops.routed_linear.default, x, self.ids_for(use.token_axes, lead, x),
                                weight, None)
            elif use.kind == "matmul_weight_left":
                x_t = self.call(aten.transpose.int, args[1], -1, -2)
                y_t = self.call(sparsify_ops.routed_linear.default, x_t, self.ids_for(use.token_axes, lead, x_t),
                                self.stacked(args[0], stacked), None)
                new = self.call(aten.transpose.int, y_t, -1, -2)
            elif use.kind in ("conv1d_weight", "conv1d_bias"):
                self.rewrite_conv1d(node, args, stacked)
                return
            elif use.kind in ("layer_norm_weight", "layer_norm_bias"):
                x, _, weight, bias, eps = (args + [None, None, 1e-5])[:5]
                new = self.call(sparsify_ops.routed_layer_norm.default, x, self.ids_for(use.token_axes, lead, x),
                                self.stacked(weight, stacked), self.stacked(bias, stacked), eps)
            else:  # find_param_uses reported every other kind as a problem already
                raise RoutingError(f"internal: no rewrite for {use.kind} at {describe_node(node)}")
        new.meta.update(node.meta)
        new.meta["sparsify_dense_node"] = node.name
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def fuse_rms_norm(self, node: torch.fx.Node, use: ParamUse, args: list, stacked: set) -> bool:
        """mul(w, rmsnorm(h)) => sparsify.routed_rms_norm(h, ids, w), cast to the mul's dtype; False if no match."""
        match = match_rms_norm(node, use.operand)
        weight = args[use.operand]
        if match is None or weight.meta.get("val") is None or weight.meta["val"].dim() != 1:
            return False
        h = match.normalized
        lead = h.meta["val"].dim() - 1
        out = self.call(sparsify_ops.routed_rms_norm.default, h, self.ids_for(use.token_axes, lead, h),
                        self.stacked(weight, stacked), match.eps)
        dtype = node.meta["val"].dtype
        if dtype != torch.promote_types(h.meta["val"].dtype, weight.meta["val"].dtype):
            out = self.call(aten._to_copy.default, out)
            out.kwargs = {"dtype": dtype}
        out.meta.update(node.meta)
        out.meta["sparsify_dense_node"] = node.name
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        return True

    def rewrite_conv1d(self, node: torch.fx.Node, args: list, stacked: set) -> None:
        """conv1d(x, w, b, padding=K-1, groups=C)[..., :T]  =>  sparsify.routed_conv1d(x, ids, w[:, :, 0], b)."""
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        channels, _, kernel = weight.meta["val"].shape  # dense [C, 1, K]; lifted nodes keep their dense meta
        weight = self.call(aten.reshape.default, self.stacked(weight, stacked), [self.modalities, channels, kernel])
        new = self.call(sparsify_ops.routed_conv1d.default, x, self.modality_ids, weight, self.stacked(bias, stacked))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        chain = conv1d_trim_chain(node)  # the slices back to the sequence length: the routed conv replaces them
        new.meta["val"] = chain[-1].meta.get("val")
        new.meta["sparsify_dense_node"] = chain[-1].name
        chain[-1].replace_all_uses_with(new)
        for dead in reversed([node] + chain):
            self.graph.erase_node(dead)

    def gathered(self, use: ParamUse, param: torch.fx.Node) -> torch.fx.Node:
        """Per-token copies of an elementwise parameter, laid out to broadcast against the op's output.

        The parameter aligned to the output has size 1 at the token dims (checked by find_param_uses):
        drop those, gather per token ([tokens..., *rest]), then move the token dims into place.
        """
        dense_val = (use.view_chain[-1] if use.view_chain else param).meta["val"]
        aligned = broadcast_param_shape(use, dense_val)
        out_rank = len(aligned)
        ids, token_dims = self.ids_with_tokens_in_order(use.token_axes)
        rest = [size for d, size in enumerate(aligned) if d not in token_dims]
        param = self.call(aten.reshape.default, param, [self.modalities] + rest)
        out = self.call(sparsify_ops.routed_gather.default, param, ids)
        rest_dims = iter(range(len(token_dims), out_rank))
        token_sources = iter(range(len(token_dims)))
        permutation = [next(token_sources) if d in token_dims else next(rest_dims) for d in range(out_rank)]
        if permutation != list(range(out_rank)):
            out = self.call(aten.permute.default, out, permutation)
        return out
