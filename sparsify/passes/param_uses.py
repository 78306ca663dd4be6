"""Analysis: every use of every parameter in a captured graph, classified for routing.

A use is the first non-view op a parameter reaches, following view and cast ops
applied to the parameter alone (`w.t()`, `w.to(bf16)`, `w.view(...)`): those are
re-applied to the stacked parameter, and the op they feed is what gets routed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx

from sparsify.errors import describe_node
from sparsify.passes import node_value
from sparsify.ops.spec import SPECS, UseKind, use_kinds
from sparsify.passes.norm_patterns import find_norms, norm_match
from sparsify.passes.token_axes import TokenAxes, axes_from_tokens, find_token_axes, shape_env_of, size_exprs
from sparsify.passes.token_provenance import Tokens, computed_from, token_provenance, tokens_of, without_tokens

aten = torch.ops.aten

# Ops that only view or cast a parameter; re-applied with the modality dim in front.
PARAM_VIEW_OPS = {
    aten.t.default, aten.numpy_T.default, aten.mT.default, aten.transpose.int, aten.permute.default,
    aten.view.default, aten.reshape.default,
    aten.unsqueeze.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
    aten.contiguous.default, aten.detach.default, aten.alias.default, aten.squeeze.dim,
}
# Elementwise ops of the parameter alone (A = -exp(A_log)): they commute with stacking, so they
# are re-applied to the stacked parameter unchanged and the op their result feeds is the use.
PARAM_UNARY_OPS = {
    aten.exp.default, aten.neg.default, aten.sigmoid.default, aten.tanh.default, aten.abs.default,
    aten.sqrt.default, aten.rsqrt.default, aten.log.default, aten.softplus.default, aten.reciprocal.default,
    aten.mul.Scalar, aten.add.Scalar, aten.div.Scalar, aten.sub.Scalar, aten.pow.Tensor_Scalar,
}
ELEMENTWISE_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, operator.mul, operator.add}
MATMUL_OPS = {aten.mm.default, aten.matmul.default}


@dataclass
class ParamUse:
    """One op that consumes a parameter (possibly through views of it)."""

    node: torch.fx.Node          # the consuming op
    operand: int                 # index in node.args of the parameter-derived operand
    kind: str                    # a UseKind's name (ops/spec.py)
    view_chain: list[torch.fx.Node] = field(default_factory=list)
    token_axes: TokenAxes | None = None
    problem: str | None = None   # why the use cannot be routed
    # Whether its token axes came from sizes (find_token_axes) where provenance knew nothing: only then can
    # the sizes a graph was captured at decide the axes (a feature size equal to a static sequence length).
    axes_from_sizes: bool = False
    # Applied to values no input token went into (a zero state before the first token), or to positions laid
    # out from no token (one n-gram stream split off a laid-out sequence): no token to take a copy by, so
    # modality 0's copy is used (route), where another use of the parameter is per token.
    token_free: bool = False

    @property
    def spec(self) -> UseKind:
        return use_kinds()[self.kind]

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def norm(self):
        """The norm layer (norm_patterns.NormMatch) this use belongs to, if a pattern matched one."""
        return norm_match(self.node)

    def describe(self) -> str:
        where = f", {self.token_axes}" if self.token_axes else (", no token: modality 0's copy" if self.token_free
                                                                 else "")
        spelling = f" [{self.norm.spelling}]" if self.norm is not None else ""
        lifted = f"; {self.spec.lift}" if self.spec.lift and self.problem is None else ""
        return f"{self.kind} in {self.node.target}{spelling}{where}{lifted}"


# -- norm-like values: decided from what a value is computed from, not from which ops sit nearby --------
# A parameter that multiplies x / sqrt(stat(x) + eps), where stat is x's own mean square or variance, is a
# norm's scale whatever the spelling. Nearness to an rsqrt is not enough: the previous block's norm sits a
# few ops above an activation's own parameter.
# Casts and copies, and reshapes: a grouped norm (Mamba2's gated RMSNorm) normalises a view of [..., groups,
# D / groups] and scales the value viewed back.
PASS_THROUGH_OPS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
                    aten.contiguous.default, aten.detach.default, aten.alias.default, aten.view.default,
                    aten.reshape.default, aten._unsafe_view.default}
NORM_OPS = {aten.layer_norm.default, aten.rms_norm.default}  # weightless F.layer_norm / F.rms_norm, then a scale


def _call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _scalar(value, *allowed) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (not allowed or value in allowed)


def _strip(node):
    """`node` without the casts, copies and reshapes around it (a norm computed in fp32 and cast back)."""
    while _call(node, *PASS_THROUGH_OPS):
        node = node.args[0]
    return node


def _source(node):
    """The value a statistic describes: `node` stripped, and `x - mean(x)` taken as x (LayerNorm centres)."""
    node = _strip(node)
    if _call(node, aten.sub.Tensor):
        x, mean = node.args[:2]
        mean = _strip(mean)
        if _call(mean, aten.mean.dim) and _source(mean.args[0]) is _source(x):
            return _source(x)
        if _call(mean, operator.getitem) and mean.args[1] == 1 and _call(mean.args[0], aten.var_mean.correction) \
                and _source(mean.args[0].args[0]) is _source(x):
            return _source(x)
    return node


def _without_eps(node):
    """`node` without the eps that keeps a root finite: added, or as a floor (clamp_min(eps))."""
    node = _strip(node)
    if _call(node, aten.add.Tensor, aten.add.Scalar, aten.clamp_min.default) and _scalar(node.args[1]):
        return _strip(node.args[0])
    if _call(node, aten.clamp.default) and _scalar(node.args[1]) and (len(node.args) < 3 or node.args[2] is None):
        return _strip(node.args[0])
    return node


def _variance_of(node):
    """x where `node` is x's mean square or variance (plus eps), else None."""
    node = _without_eps(node)
    if _call(node, aten.mean.dim):
        square = _strip(node.args[0])
        if _call(square, aten.pow.Tensor_Scalar) and _scalar(square.args[1], 2):
            return _source(square.args[0])
        if _call(square, aten.mul.Tensor) and _source(square.args[0]) is _source(square.args[1]):
            return _source(square.args[0])
    if _call(node, aten.var.correction):
        return _source(node.args[0])
    if _call(node, operator.getitem) and node.args[1] == 0 and _call(node.args[0], aten.var_mean.correction):
        return _source(node.args[0].args[0])
    return None


def _root_of_variance_of(node):
    """x where `node` is sqrt(variance(x) + eps) in any spelling (sqrt, ** 0.5, std + eps), else None."""
    node = _without_eps(node)
    if _call(node, aten.std.correction):
        return _source(node.args[0])
    if _call(node, aten.sqrt.default) or (_call(node, aten.pow.Tensor_Scalar) and _scalar(node.args[1], 0.5)):
        return _variance_of(node.args[0])
    return None


def _inverse_root_of_variance_of(node):
    """x where `node` is 1 / sqrt(variance(x) + eps) in any spelling (rsqrt, ** -0.5, 1 / sqrt), else None."""
    node = _strip(node)
    if _call(node, aten.mul.Tensor) and _scalar(node.args[1], 1):  # `1 / t` exports as reciprocal(t) * 1
        node = _strip(node.args[0])
    if _call(node, aten.rsqrt.default) or (_call(node, aten.pow.Tensor_Scalar) and _scalar(node.args[1], -0.5)):
        return _variance_of(node.args[0])
    if _call(node, aten.reciprocal.default):
        return _root_of_variance_of(node.args[0])
    return None


def is_normalized(node) -> bool:
    """Whether `node` is a value divided by a root of its own mean square or variance (a norm without its
    scale), up to casts: x * rsqrt(mean(x^2) + eps), (x - mu) / sqrt(var + eps), x * (ms + eps) ** -0.5, ..."""
    node = _strip(node)
    if _call(node, *NORM_OPS) or (_call(node, operator.getitem) and node.args[1] == 0
                                  and _call(node.args[0], aten.native_layer_norm.default)):
        return True
    if _call(node, aten.mul.Tensor):
        a, b = node.args[:2]
        return any(isinstance(x, torch.fx.Node) and _inverse_root_of_variance_of(r) is _source(x)
                   for x, r in ((a, b), (b, a)))
    if _call(node, aten.div.Tensor):
        x, root = node.args[:2]
        return isinstance(x, torch.fx.Node) and _root_of_variance_of(root) is _source(x)
    return False


SHAPE_OPS = PARAM_VIEW_OPS | {aten.squeeze.default, aten.expand.default}
LINEAR_OPS = {aten.linear.default, aten.addmm.default} | MATMUL_OPS


def is_matmul_output(node, depth: int = 4) -> bool:
    """Whether `node` is a linear/matmul result, possibly reshaped: a parameter added to it is a bias."""
    for _ in range(depth):
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return False
        if node.target in LINEAR_OPS:
            return True
        if node.target not in SHAPE_OPS:
            return False
        node = node.args[0]
    return False


def _token_source(use: ParamUse) -> torch.fx.Node:
    """The graph value whose token dims route this use."""
    index = use.spec.token_operand
    return use.node.args[index] if index is not None else use.node


def _token_tensor(use: ParamUse):
    """The tensor whose token dims route this use, and how many leading dims the ids must cover."""
    x = node_value(_token_source(use))
    if x is None:
        return None, 0
    layout = use.spec.token_layout
    if layout == "channels_first":
        return x, 3  # [batch, channels, time]
    if layout == "columns":
        return x.transpose(-1, -2), x.dim() - 1  # w @ x contracts x's dim -2; tokens sit in the others
    if layout == "rows":
        return x, x.dim() - 1
    return x, x.dim()


def _token_provenance(use: ParamUse) -> Tokens | None:
    tokens = tokens_of(_token_source(use))
    if tokens is not None and use.spec.token_layout == "columns" and len(tokens.labels) >= 2:
        labels = list(tokens.labels)
        labels[-1], labels[-2] = labels[-2], labels[-1]
        tokens = Tokens(tuple(labels), tokens.position)
    return tokens


def classify(node: torch.fx.Node, operand: int, param_val) -> tuple[str, str | None]:
    """(kind, problem) of a parameter-derived value used as node.args[operand]: the first routed op spec
    (ops/spec.py, in registration order) that claims the use, else unsupported."""
    for spec in SPECS:
        claimed = spec.classify(node, operand, param_val) if spec.classify is not None else None
        if claimed is not None:
            return claimed
    return "unsupported", (f"{node.target} is not an op sparsify can route (linear, addmm, mm/matmul, layer_norm, "
                           "rms_norm, causal conv1d, embedding, elementwise)")


def find_param_uses(
    graph_module: torch.fx.GraphModule, param_nodes: Sequence[torch.fx.Node], token_dims: tuple,
    user_inputs: Sequence[torch.fx.Node],
) -> dict[torch.fx.Node, list[ParamUse]]:
    """Uses of each parameter placeholder in `param_nodes`. `user_inputs` are the placeholders of the
    model's own inputs, whose (batch, seq) dims provenance follows. Runs the norm-pattern and token
    provenance analyses first (their results land in node.meta)."""
    find_norms(graph_module)
    from_inputs = computed_from(graph_module.graph, user_inputs)
    token_provenance(graph_module, user_inputs, token_dims, from_inputs)
    uses: dict[torch.fx.Node, list[ParamUse]] = {node: [] for node in param_nodes}
    for placeholder in param_nodes:
        stack = [(placeholder, [])]
        while stack:
            value, chain = stack.pop()
            for user in value.users:
                if user.args and user.args[0] is value and (
                        user.target in PARAM_VIEW_OPS or user.target in PARAM_UNARY_OPS
                        or _scalar_elementwise(user, value)):
                    stack.append((user, chain + [user]))
                    continue
                operand = next(i for i, a in enumerate(user.args) if a is value) if value in user.args else -1
                if operand < 0:
                    use = ParamUse(user, operand, "unsupported", chain,
                                   problem=f"the parameter is passed by keyword to {user.target}")
                else:
                    kind, problem = classify(user, operand, node_value(value))
                    use = ParamUse(user, operand, kind, chain, problem=problem)
                if use.problem is None:
                    axes, use.axes_from_sizes = _use_token_axes(use, token_dims)
                    if isinstance(axes, str) and user not in from_inputs and use.spec.token_layout != "indices":
                        use.token_free = True
                    elif isinstance(axes, TokenAxes) and without_tokens(axes.sequence):
                        use.token_free = True  # laid out from positions no token went into only (one n-gram stream)
                    elif isinstance(axes, str):
                        use.problem = f"cannot find its token dims: {axes}"
                    elif not _tokens_outside_param(use, axes, node_value(value)):
                        use.problem = (f"its tokens ({axes}) fall inside the dims the parameter covers; "
                                       "only per-token parameters can be routed")
                    else:
                        use.token_axes = axes
                uses[placeholder].append(use)
    return uses


def _use_token_axes(use: ParamUse, token_dims: tuple) -> tuple[TokenAxes | str, bool]:
    """Token axes of a use from provenance; sizes decide only where provenance knows nothing. With whether
    sizes decided."""
    tensor, _ = _token_tensor(use)
    if tensor is None:
        return "no shape information recorded for this node", False
    tokens = _token_provenance(use)
    single_token = token_dims[0] == 1 and token_dims[1] == 1
    if tokens is not None and tokens.any:
        axes = axes_from_tokens(tokens, token_dims, size_exprs(tensor))
        if not isinstance(axes, str) or not single_token:
            return axes, False
    if use.spec.token_layout == "indices":
        # A lookup is routed only where its indices are the model's tokens (not positions made by arange):
        # sizes cannot tell token ids from position ids.
        return "its indices do not carry the model's tokens (position ids?)", False
    # Provenance lost the tokens (an op it does not know) or there is one token (any unit dim holds it).
    axes = find_token_axes(size_exprs(tensor), token_dims, shape_env_of(tensor))
    lost = _where_tokens_were_lost(_token_source(use))
    if isinstance(axes, str) and lost is not None:
        axes = (f"token provenance stops at {describe_node(lost)} (no rule for {lost.target}); by sizes: {axes}. "
                "Please report the op; meanwhile exclude=<regex> keeps this parameter shared")
    return axes, True


def _where_tokens_were_lost(node: torch.fx.Node, max_nodes: int = 200) -> torch.fx.Node | None:
    """The nearest upstream op whose output has no token labels although one of its inputs has."""
    seen, frontier = set(), [node]
    while frontier and len(seen) < max_nodes:
        current = frontier.pop(0)
        if current in seen or not isinstance(current, torch.fx.Node):
            continue
        seen.add(current)
        inputs = current.all_input_nodes
        if any((tokens_of(i) or Tokens(())).any for i in inputs) and not (tokens_of(current) or Tokens(())).any:
            return current
        frontier.extend(inputs)
    return None


def _scalar_elementwise(node: torch.fx.Node, value: torch.fx.Node) -> bool:
    """`w * 2.0`, `w + 1`: an elementwise op of the parameter and a Python number."""
    return node.target in ELEMENTWISE_OPS and len(node.args) == 2 and node.args[0] is value and \
        not isinstance(node.args[1], torch.fx.Node)


def param_shape_in_output(param_shape, out_rank: int) -> list[int]:
    """The parameter's shape aligned to an elementwise op's output by broadcasting (left-padded with ones)."""
    shape = list(param_shape)
    return [1] * (out_rank - len(shape)) + shape


def broadcast_param_shape(use: "ParamUse", param_val) -> list[int]:
    """How the parameter broadcasts against the token tensor: as is, or [D, 1] for a scan's delta bias."""
    channels_first = use.spec.token_layout == "channels_first"  # a [D] parameter broadcasts as [D, 1] there
    shape = list(param_val.shape) + ([1] if channels_first else [])
    return param_shape_in_output(shape, _token_tensor(use)[0].dim())


def _tokens_outside_param(use: ParamUse, axes: TokenAxes, param_val) -> bool:
    """Token dims must be dims the parameter does not span: features for matmul-like ops, or dims where
    an elementwise parameter broadcasts (size 1 after aligning it to the output)."""
    tensor, lead = _token_tensor(use)
    if use.spec.gathered:
        aligned = broadcast_param_shape(use, param_val)
        return all(aligned[d] == 1 for d in axes.dims)
    if use.spec.token_layout == "channels_first":
        # [batch, channels, time]; with a batch of one the time dim alone carries the tokens
        return axes.dims == (0, 2) or (axes.dims == (2,) and tensor.shape[0] == 1)
    return max(axes.dims) < lead


def token_tensor_lead_dims(use: ParamUse) -> int:
    """How many leading dims of the use's token tensor the modality ids must cover."""
    return _token_tensor(use)[1]
