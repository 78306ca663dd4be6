"""Route: rewrite every use of a routed parameter into an op that picks each token's modality copy.

    linear(x, w, b)      => sparsify.routed_linear(x, ids, w_stacked, b_stacked)
    addmm(b, x, w)       => sparsify.routed_linear(x, ids, w_stacked.transpose(1, 2), b_stacked)
    w @ x                => sparsify.routed_linear(x.mT, ids, w_stacked).mT
    layer_norm(x, w, b)  => sparsify.routed_layer_norm(x, ids, w_stacked, b_stacked)
    <an RMSNorm / LayerNorm in any spelling norm_patterns knows>  => sparsify.routed_rms_norm / routed_layer_norm
    embedding(w, tokens) => sparsify.routed_embedding(tokens, ids, w_stacked)
    mul(w, h)            => mul(sparsify.routed_gather(w_stacked, ids) shaped to broadcast, h)

The routed parameter's placeholder receives the stacked [M, *S] tensor at run
time; view and cast ops applied to it alone are rewritten to keep the modality
dim in front. `modality_ids` is a new placeholder after all others. Each rewrite
is declared beside its op (ops/<op>.py, its spec's UseKind.rewrite); this pass
gives them the helpers below (ids laid out as the tokens, stacked operands, the
replacement map) and runs them in graph order.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx

from sparsify import ops  # noqa: F401  (registers torch.ops.sparsify.*)
from sparsify.errors import PassOrderError, RoutingError, describe_node
from sparsify.passes import PassBase, PassResult
from sparsify.passes.graph_check import check_graph, snapshot_values
from sparsify.passes.param_uses import ParamUse, broadcast_param_shape, find_param_uses, token_tensor_lead_dims
from sparsify.passes.token_axes import TokenAxes
from sparsify.passes.token_provenance import PICKED, SEQUENCE_LONG, sequence_pieces

aten = torch.ops.aten
sparsify_ops = torch.ops.sparsify
MODALITY_IDS = "modality_ids"


class RoutePass(PassBase):
    """Route the parameters named in `routed`.

    `param_fqns` maps parameter placeholder names to FQNs; `user_inputs` names the placeholders of the
    model's own inputs (whose token dims provenance follows); `uses` is the plan's analysis of this same
    graph (param_uses.find_param_uses), reused instead of analysing again.
    """

    name = "route"

    def __init__(self, *, param_fqns: dict[str, str], routed: set[str], modalities: int, token_dims: tuple,
                 user_inputs: list[str], uses: dict | None = None, autocast: bool = False):
        self.param_fqns, self.routed, self.modalities, self.autocast = param_fqns, routed, modalities, autocast
        self.token_dims, self.user_inputs, self.uses = token_dims, user_inputs, uses
        self._before: dict = {}
        self._reshaped: set = set()

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if is_routed(graph_module):
            raise PassOrderError("pass 'route' runs once, on a captured dense graph: this graph is routed already "
                                 "(it has a modality_ids input)")
        self._before = snapshot_values(graph_module)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        check_graph(graph_module, self.name, self._before, self._reshaped)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        param_nodes = [n for n in placeholders if self.param_fqns.get(n.name) in self.routed]
        if not param_nodes:
            return PassResult(graph_module, False)
        uses = self.uses
        if uses is None or any(n not in uses for n in param_nodes):
            uses = find_param_uses(graph_module, param_nodes, self.token_dims,
                                   [n for n in placeholders if n.name in set(self.user_inputs)])
        uses = {n: uses[n] for n in param_nodes}
        problems = [f"- {self.param_fqns[n.name]}: {describe_node(u.node)}: {u.problem}"
                    for n, us in uses.items() for u in us if u.problem]
        problems += [f"- {self.param_fqns[n.name]}: {describe_node(us[0].node)}: every use acts on values no input "
                     "token went into, so only modality 0's copy would ever be used" for n, us in uses.items()
                     if us and all(u.token_free for u in us)]
        if problems:
            raise RoutingError(
                "these parameters were selected for routing but have uses sparsify cannot route:\n"
                + "\n".join(problems)
                + "\nLeave them shared with exclude=<regex>, or open an issue with the op named above."
            )

        with graph.inserting_after(placeholders[-1]):
            modality_ids = graph.placeholder(MODALITY_IDS)
        rewriter = Rewriter(graph, modality_ids, self.modalities, self.autocast)
        stacked: set[torch.fx.Node] = set(param_nodes)
        uses_by_node: dict[torch.fx.Node, list[ParamUse]] = defaultdict(list)
        for node_uses in uses.values():
            for use in node_uses:
                for view in use.view_chain:
                    if view not in stacked:
                        _lift_view(view, self.modalities)
                        stacked.add(view)
                uses_by_node[use.node].append(use)
        self._reshaped = set(stacked)
        for node in [n for n in graph.nodes if n in uses_by_node]:  # graph order: shared id views come first
            try:
                rewriter.rewrite(node, uses_by_node[node], stacked)
            except Exception as e:
                e.sparsify_node = node  # run_passes reports where (an InternalError, with the graph around it)
                raise
        # Only now: the rewrites read the dense shapes of the parameters.
        _give_values(modality_ids, param_nodes, placeholders, self.user_inputs, self.modalities)

        graph.eliminate_dead_code()  # the dense ops a fused norm replaced
        graph_module.recompile()
        return PassResult(graph_module, True)


def is_routed(graph_module: torch.fx.GraphModule) -> bool:
    return any(n.name == MODALITY_IDS for n in graph_module.graph.nodes if n.op == "placeholder")


def require_routed(graph_module: torch.fx.GraphModule, pass_name: str) -> None:
    """The precondition of every pass after route (pipeline.py)."""
    if not is_routed(graph_module):
        raise PassOrderError(f"pass '{pass_name}' runs after 'route' (sparsify/passes/pipeline.py): this graph has "
                             "no modality_ids input, so it is not routed yet")


def route(graph_module: torch.fx.GraphModule, **config) -> PassResult:
    """RoutePass(**config)(graph_module): requires, call, ensures."""
    return RoutePass(**config)(graph_module)


def _give_values(modality_ids: torch.fx.Node, param_nodes: list, placeholders: list, user_inputs: list,
                 modalities: int) -> None:
    """Example (fake) values for the new input and the stacked parameters, in the capture's fake mode."""
    token = next((n.meta.get("val") for n in placeholders if n.name in set(user_inputs)
                  and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2), None)
    mode = getattr(token, "fake_mode", None)
    if mode is None:
        return  # a graph without fake values (not from export): check_graph has nothing to propagate
    with mode:
        modality_ids.meta["val"] = torch.empty(token.shape[:2], dtype=torch.long, device=token.device)
        for node in param_nodes:
            dense = node.meta["val"]
            node.meta["val"] = torch.empty((modalities, *dense.shape), dtype=dense.dtype, device=dense.device)


def _rank(node: torch.fx.Node) -> int:
    return node.meta["val"].dim()


def _lift_view(node: torch.fx.Node, modalities: int) -> None:
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
        node.args = (source, [modalities] + list(node.args[1]))  # not -1: the view may infer a dim itself
    elif node.target == aten.unsqueeze.default:
        node.args = (source, node.args[1] % (rank + 1) + 1)
    elif node.target == aten.squeeze.dim:
        node.args = (source, node.args[1] % rank + 1)
    # casts, clone, contiguous, detach, alias act elementwise: unchanged


class Rewriter:
    """What each op's rewrite (ops/<op>.py) is handed: node creation in the rewritten node's module scope,
    modality ids laid out as a tensor's token dims, operands as stacked [M, ...] tensors, per-token copies,
    a norm fused into one op, and the map of replaced nodes."""

    def __init__(self, graph: torch.fx.Graph, modality_ids: torch.fx.Node, modalities: int, autocast: bool = False):
        self.graph = graph
        self.autocast = autocast
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
        self.fused_norms: set[int] = set()
        # dense node -> the node that replaced it. The analyses (norm matches) name nodes as they were before
        # this pass; a norm right on a linear's output names a linear that its own rewrite already replaced.
        self.replacements: dict[torch.fx.Node, torch.fx.Node] = {}

    def current(self, value):
        """`value` (a node or a structure of nodes) with every replaced node looked up in `replacements`."""
        def latest(node: torch.fx.Node) -> torch.fx.Node:
            while node in self.replacements:
                node = self.replacements[node]
            return node
        return torch.fx.node.map_arg(value, latest)

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
        elif axes.sequence:
            key = ("split", axes.dims[0] < axes.dims[1], axes.sequence)
            lay_out = self.picked_ids if axes.sequence.startswith(PICKED) else self.laid_out_ids
            make = lambda: lay_out(axes.sequence, transposed=not key[1])  # noqa: E731
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

    def laid_out_ids(self, sequence: str, transposed: bool) -> torch.fx.Node:
        """[batch, seq] ids for a sequence laid out from pieces (token_provenance.sequence_pieces): each run of
        the input sequence takes its tokens' ids, each position no input token went into modality 0's."""
        parts = []
        for piece in sequence_pieces(sequence):
            if piece[0] == "x":
                batch = self.call(aten.sym_size.int, self.modality_ids, 0)
                count = self.call(aten.sym_size.int, self.modality_ids, 1) if piece[1] == SEQUENCE_LONG else piece[1]
                parts.append(self.call(aten.new_zeros.default, self.modality_ids, [batch, count]))
            else:
                _, start, end = piece
                end = end if end < 0 else 2 ** 63 - 1  # an end offset of 0: to the end
                parts.append(self.call(aten.slice.Tensor, self.modality_ids, 1, start, end))
        ids = self.call(aten.cat.default, parts, 1)
        return self.call(aten.transpose.int, ids, 0, 1) if transposed else ids

    def picked_ids(self, label: str, transposed: bool) -> torch.fx.Node:
        """[batch, rows] ids for rows that pick sequence positions (token_provenance.PICKED): each row takes
        the modality of the position it weighs most in the input [batch, rows, seq] that picks them."""
        name = label[len(PICKED):]
        picks = next((n for n in self.graph.nodes if n.op == "placeholder" and n.name == name), None)
        if picks is None:
            raise RoutingError(f"internal: routed ops take ids from the rows of input '{name}', which this graph "
                               "does not have; please report this model")
        positions = self.call(aten.argmax.default, picks, -1)
        ids = self.call(aten.gather.default, self.modality_ids, 1, positions)
        return self.call(aten.transpose.int, ids, 0, 1) if transposed else ids

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

    @staticmethod
    def lead(uses: list[ParamUse]) -> int:
        """How many leading dims of the use's token tensor the ids cover."""
        return token_tensor_lead_dims(uses[0])

    def rewrite(self, node: torch.fx.Node, uses: list[ParamUse], stacked: set) -> None:
        """Rewrite `node` (every use it makes of routed parameters) with its kind's rewrite (ops/spec.py)."""
        if any(id(u.norm) in self.fused_norms for u in uses if u.norm is not None):
            return  # a norm's weight and bias are two uses of one match: fused once, at the first
        self.stack = node.meta.get("nn_module_stack") or self.root_stack
        token_free = [u for u in uses if u.token_free]
        if token_free:  # no token to pick a copy by: modality 0's copy, in the op as it is
            with self.graph.inserting_before(node):
                args = list(node.args)
                for use in token_free:
                    args[use.operand] = self.call(aten.select.int, args[use.operand], 0, 0)
                node.args = tuple(args)
            uses = [u for u in uses if not u.token_free]
            if not uses:
                return
        with self.graph.inserting_before(node):
            args = self.as_autocast_ran(node, list(node.args), stacked) if self.autocast else list(node.args)
            new = uses[0].spec.rewrite(self, node, uses, args, stacked)
        if new is not None:
            self.replace(node, new)

    def as_autocast_ran(self, node: torch.fx.Node, args: list, stacked: set) -> list:
        """`args` cast as autocast cast them for `node`, in a graph captured under torch.autocast: the graph's
        dense ops are cast again by autocast when they run, a routed op is not. An op whose output dtype is not
        its floating operands' promoted dtype (a linear computing in bf16 from fp32 operands; a layer_norm in
        fp32 from bf16 on CUDA) ran with its floating operands cast to its output dtype."""
        out = node.meta.get("val")
        floating = [a for a in args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
                    and a.meta["val"].dtype.is_floating_point]
        if not isinstance(out, torch.Tensor) or not floating:
            return args
        promoted = floating[0].meta["val"].dtype
        for a in floating[1:]:
            promoted = torch.promote_types(promoted, a.meta["val"].dtype)
        if promoted == out.dtype:
            return args
        cast_args = []
        for a in args:
            if a in floating and a.meta["val"].dtype != out.dtype:
                cast = self.call(aten._to_copy.default, a)
                cast.kwargs = {"dtype": out.dtype}
                cast.meta["val"] = a.meta["val"].to(out.dtype)
                if a in stacked:  # a routed parameter cast is still the stacked parameter
                    stacked.add(cast)
                a = cast
            cast_args.append(a)
        return cast_args

    def replace(self, node: torch.fx.Node, new: torch.fx.Node, meta_from: torch.fx.Node | None = None) -> None:
        """`new` computes what `node` did: it takes node's uses (and `meta_from`'s metadata, default node's)."""
        new.meta.update({k: v for k, v in (meta_from or node).meta.items() if k != "val"})
        # The routed node computes the dense node's value (same shape and dtype): later rewrites that read
        # this operand's shape (a scan's delta, routed before its bias) find it there.
        new.meta.setdefault("val", node.meta.get("val"))
        new.meta["sparsify_dense_node"] = node.name
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.replacements[node] = new

    def fuse_norm(self, uses: list[ParamUse], stacked: set, build, *, x=None, weight=None, bias=None, eps=None,
                  output=None) -> None:
        """One routed norm op for a norm layer: an ATen norm op (its operands given), or a norm_patterns match
        (operands from the match, looked up through the replacements: a norm right on a linear's output names
        the linear its own rewrite replaced). `build(self, x, ids, weight, bias, eps)` makes the routed node
        and says the dtype it computes in; a cast follows where the model's output has another."""
        match = uses[0].norm
        if match is not None:
            self.fused_norms.add(id(match))
            x, weight, bias, output = self.current((match.normalized, match.weight, match.bias, match.output))
            eps = match.eps
        with self.graph.inserting_before(output):  # after every operand of the norm
            ids = self.ids_for(uses[0].token_axes, x.meta["val"].dim() - 1, x)
            new, computed = build(self, x, ids, self.stacked(weight, stacked), self.stacked(bias, stacked), eps)
            dtype = output.meta["val"].dtype
            if dtype != computed:  # the model cast the normalised value (Llama: back to the input dtype)
                new = self.call(aten._to_copy.default, new)
                new.kwargs = {"dtype": dtype}
        self.replace(output, new)

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
