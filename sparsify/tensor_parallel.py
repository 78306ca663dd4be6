"""Tensor parallelism for a routed model: its routed linears split along their feature dims (issue 29).

A routed linear's stacked weight [M, N, K] is split along its feature dims, never the modality dim, as
Megatron splits a dense one: column-wise (N: weight Shard(1), bias Shard(1), input replicated, output
sharded on its last dim) or row-wise (K: weight Shard(2), input sharded on its last dim, output a partial
sum; the bias is handed in as a partial value so that it is added once). Registered with DTensor's own
`register_sharding`, so a routed op called on DTensors runs on each rank's shard and DTensor inserts the
collectives; its backward op has the matching rules (column-wise: dx partial, dW and db sharded; row-wise:
dx sharded, dW sharded, db replicated). `permute_rows` (the hoisted blocks' row order) keeps any placement
but the rows' own dim. Every rule also lists "all replicated".

A whole model runs as torchtitan and transformers' tp_plan run one: DTensors only inside each split linear,
plain per-rank tensors between them (`parallelize_module` here, in torch's plan style). The graphs are captured
on each rank's shards (RoutedModel.dense_view gives a split weight's local part), so the attention between a
column-wise and a row-wise linear sees its rank's heads: a model whose forward sizes its head views from its
inputs (view(..., -1, head_dim), as transformers' models do for their own tp_plan) runs unchanged; one that
writes its head count into a view fails at capture, with the reason. At run time `local_call` wraps a split
linear's per-rank input as the DTensor its placement wants and gives back the per-rank output: column-wise,
the input is replicated (its gradient all-reduced in backward); row-wise, the partial outputs are all-reduced.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

import sparsify.ops  # noqa: F401  (defines the custom ops registered below)
from sparsify.errors import SparsifyError
from sparsify.routed_model import SPLIT_MARK, TENSOR_PARALLEL_MESH

REPLICATE = Replicate()


def _optional(placement, tensor):
    return None if tensor is None else placement


@register_sharding(torch.ops.sparsify.routed_linear.default)
def routed_linear_sharding(x, modality_ids, weight, bias=None, backend="auto"):
    last = x.ndim - 1
    return [
        ([REPLICATE], [REPLICATE, REPLICATE, REPLICATE, _optional(REPLICATE, bias), None]),
        ([Shard(last)], [REPLICATE, REPLICATE, Shard(1), _optional(Shard(1), bias), None]),          # column-wise
        ([Partial()], [Shard(last), REPLICATE, Shard(2), _optional(Partial(), bias), None]),         # row-wise
    ]


@register_sharding(torch.ops.sparsify.routed_linear_backward.default)
def routed_linear_backward_sharding(grad, x, modality_ids, weight, has_bias, backend="auto", frozen=None):
    last = x.ndim - 1
    rest = [None, None, None]  # has_bias, backend, frozen
    return [
        ([REPLICATE, REPLICATE, REPLICATE], [REPLICATE, REPLICATE, REPLICATE, REPLICATE, *rest]),
        # column-wise: each rank's output columns give a partial dx, its own rows of dW and db
        ([Partial(), Shard(1), Shard(1) if has_bias else REPLICATE],
         [Shard(grad.ndim - 1), REPLICATE, REPLICATE, Shard(1), *rest]),
        # row-wise: each rank's input columns give its columns of dx and of dW; db from the whole grad
        ([Shard(last), Shard(2), REPLICATE], [REPLICATE, Shard(last), REPLICATE, Shard(2), *rest]),
    ]


@register_sharding(torch.ops.sparsify.permute_rows.default)
def permute_rows_sharding(rows, order, inverse):
    # a permutation of dim 0 (the rows): linear, and blind to how the other dims are split
    return [([REPLICATE], [REPLICATE, REPLICATE, REPLICATE]), ([Partial()], [Partial(), REPLICATE, REPLICATE])] + [
        ([Shard(dim)], [Shard(dim), REPLICATE, REPLICATE]) for dim in range(1, rows.ndim)]


# -- a whole routed model ---------------------------------------------------------------------------------
COLUMN_WISE, ROW_WISE = "colwise", "rowwise"
# The placement of a split parameter by (style, parameter name): the modality dim 0 is never split.
PLACEMENTS = {(COLUMN_WISE, "weight"): Shard(1), (COLUMN_WISE, "bias"): Shard(1),
               (ROW_WISE, "weight"): Shard(2), (ROW_WISE, "bias"): REPLICATE}


# transformers' tp_plan entry for a parameter left whole whose gradient is summed over the group: done here for
# every such parameter the graph shows (parameters_on_split_activations), so the entry itself changes nothing
SUMMED_GRADIENT = "replicated_with_grad_allreduce"


def _style(style, key: str) -> str | None:
    """'colwise' or 'rowwise' for one plan entry (None: left whole): torch's ColwiseParallel / RowwiseParallel
    with their default layouts, or transformers' tp_plan strings (a config's base_model_tp_plan)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style in (COLUMN_WISE, ROW_WISE):
        return style
    if style == SUMMED_GRADIENT:
        return None
    defaults = {ColwiseParallel: (COLUMN_WISE, ColwiseParallel()), RowwiseParallel: (ROW_WISE, RowwiseParallel())}
    if type(style) in defaults:
        kind, default = defaults[type(style)]
        if vars(style) == vars(default):
            return kind
        raise SparsifyError(
            f"tensor parallel plan entry '{key}': {type(style).__name__} with layouts {vars(style)}; sparsify splits "
            f"routed linears with the default layouts only ({vars(default)}): plain per-rank tensors between the "
            "split linears. Use the style without arguments.")
    raise SparsifyError(
        f"tensor parallel plan entry '{key}': {style!r} is not a style sparsify can apply to a routed linear; use "
        "ColwiseParallel() or RowwiseParallel() (or 'colwise' / 'rowwise'). Other parts of the model (norms, "
        "embeddings, the LM head) stay replicated over the tensor-parallel ranks.")


def matches(name: str, key: str) -> bool:
    """A module path against a plan key, dot-separated part by part with fnmatch wildcards (as torch's)."""
    parts, patterns = name.split("."), key.split(".")
    return len(parts) == len(patterns) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, patterns))


def parallelize_module(module: nn.Module, device_mesh, parallelize_plan: dict, *, routed: nn.Module | None = None,
                       check: bool = True):
    """torch.distributed.tensor.parallel.parallelize_module for the routed linears of a routed model.

    `parallelize_plan`: {module path relative to `module` (fnmatch wildcards per part, as torch's:
    "layers.*.mlp.up_proj"): ColwiseParallel() | RowwiseParallel() | "colwise" | "rowwise"}, e.g. the pairs
    q/k/v then o, gate/up then down; a transformers config's `base_model_tp_plan` is such a plan for
    `routed.model`. Each matched module's stacked parameters become DTensors on `device_mesh` (1-D) split along
    the style's feature dim (module docstring); everything else stays as it is, replicated. A parameter left
    whole that the forward applies to a rank's part of the features (a per-head q/k norm) gets its gradient
    summed over the group, found from the graph. Then capture before sharding with FSDP2, as without tensor
    parallelism (routed.precapture): graphs are captured on the local shards. Returns `module`.

    A plan can be wrong for the model in ways no shape shows: a fused q/k/v projection split column-wise and then
    chunked, attention over whole features rather than heads. `check` (default) runs the routed model forward
    and backward on its example inputs (eval mode, fixed random modality ids) before and after splitting, on
    every rank, and undoes the split with a SparsifyError where outputs or gradients differ. Skipped for
    parameters on the meta device."""
    from sparsify import modality_split
    from sparsify.sharding import routed_model_of, stacked_parameters

    routed = routed if routed is not None else routed_model_of(module)
    if device_mesh.ndim != 1:
        raise SparsifyError(f"sparsify.parallelize_module takes a 1-D device mesh (got {device_mesh.ndim}-D); pass "
                            "the tensor-parallel dim of a 2-D mesh, e.g. mesh['tp'], and shard the other with "
                            "sparsify.fully_shard(..., mesh=mesh['dp'])")
    if modality_split.is_split(routed):
        raise SparsifyError("sparsify.parallelize_module: this routed model is split into per-modality copies "
                            "(freeze); unfreeze it before splitting its linears over ranks")
    stacked = stacked_parameters(routed)
    size = device_mesh.size()
    check = check and not any(p.is_meta for p in routed.parameters())
    before = _example_run(routed) if check else None
    undo: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, name, the parameter it held)
    try:
        _split(module, device_mesh, parallelize_plan, stacked, undo)
    except BaseException:  # a plan refused halfway leaves no module split
        _undo(routed, undo)
        raise
    routed.__dict__[TENSOR_PARALLEL_MESH] = device_mesh
    routed.forget_graphs()  # captured on whole weights; the next call captures on this rank's shards
    if check:
        try:
            problem = _difference(before, _example_run(routed))
        except BaseException:
            _undo(routed, undo)
            raise
        if problem:
            _undo(routed, undo)
            raise SparsifyError(
                f"tensor parallel plan {list(parallelize_plan)}: the model split over {size} ranks computes "
                f"something else than whole ({problem}), so the plan does not fit its forward: a column-wise "
                "linear must give whole heads (or whole hidden units) that the model uses apart until a row-wise "
                "linear sums them; a fused q/k/v projection chunked after the linear, or attention over whole "
                "features, does not split that way. The model is left as it was.")
    return module


def _split(module, device_mesh, parallelize_plan: dict, stacked: dict, undo: list) -> None:
    """Each plan entry's stacked parameters made DTensors split on the style's feature dim; `undo` gets what
    each module held before."""
    from torch.distributed.tensor import distribute_tensor

    size = device_mesh.size()
    replaced: dict[int, nn.Parameter] = {}  # a weight tied between two modules stays one tensor
    for key, style in parallelize_plan.items():
        kind = _style(style, key)
        matched = [(name, sub) for name, sub in module.named_modules() if name and matches(name, key)]
        if not matched:
            raise SparsifyError(f"tensor parallel plan entry '{key}' matches no submodule of "
                                f"{type(module).__name__}")
        for name, target in matched if kind is not None else ():
            for param_name, param in list(target.named_parameters(recurse=False)):
                placement = PLACEMENTS.get((kind, param_name))
                if id(param) in replaced:
                    undo.append((target, param_name, param))
                    target.register_parameter(param_name, replaced[id(param)])
                    continue
                if placement is None or id(param) not in stacked or param.ndim != (3 if param_name == "weight" else 2):
                    raise SparsifyError(
                        f"tensor parallel plan entry '{key}': {name}.{param_name} {list(param.shape)} is not a "
                        f"routed linear's stacked weight or bias (the plan routed {len(stacked)} parameters); "
                        "sparsify splits routed linears only. Leave shared modules out of the plan (they stay "
                        "replicated), or route them (convert(..., include=[...])).")
                if isinstance(placement, Shard) and param.shape[placement.dim] % size:
                    raise SparsifyError(
                        f"tensor parallel: {name}.{param_name} {list(param.shape)} cannot be split {kind} over "
                        f"{size} ranks: its dim {placement.dim} is not a multiple of {size}")
                split = nn.Parameter(distribute_tensor(param.detach(), device_mesh, [placement]),
                                     requires_grad=param.requires_grad)
                setattr(split, SPLIT_MARK, True)
                replaced[id(param)] = split
                undo.append((target, param_name, param))
                target.register_parameter(param_name, split)


def _undo(routed, undo: list) -> None:
    """Give the split modules their whole parameters back (a plan the check refused)."""
    for target, param_name, param in reversed(undo):
        target.register_parameter(param_name, param)
    routed.__dict__.pop(TENSOR_PARALLEL_MESH, None)
    routed.forget_graphs()


def _example_run(routed) -> dict[str, torch.Tensor]:
    """The routed model's floating-point outputs on its example inputs (eval mode, fixed random modality ids,
    the same on every rank) and the gradients of a fixed random projection of them, whole, by name."""
    import torch.utils._pytree as pytree

    from sparsify.api import example_call
    from sparsify.capture import primary_tensor

    inputs = example_call(routed)
    token = primary_tensor(inputs)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, routed.plan.modalities, tuple(token.shape[:2]), generator=generator)
    was_training = routed.training
    routed.eval()
    try:
        outputs = routed(**inputs, modality_ids=ids.to(token.device))
    finally:
        routed.train(was_training)
    outputs = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    result = {f"output {i}": t.detach() for i, t in enumerate(outputs)}
    named = [(name, p) for name, p in routed.named_parameters() if p.requires_grad]
    projection = sum((t.float() * torch.randn(t.shape, generator=generator).to(t.device)).sum()
                     for t in outputs if t.requires_grad)
    if named and isinstance(projection, torch.Tensor):
        grads = torch.autograd.grad(projection, [p for _, p in named], allow_unused=True)
        for (name, _), grad in zip(named, grads):
            if grad is not None:
                result[f"gradient of {name}"] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return result


def _difference(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> str | None:
    """Where the split model's outputs or gradients differ from the whole model's beyond reduction-order
    error, or None."""
    for name, whole in before.items():
        split = after.get(name)
        if split is None:
            return f"{name}: none after splitting"
        # a row-wise linear sums partial products in another order: float error only
        tolerance = 1e-4 if whole.dtype in (torch.float32, torch.float64) else 2e-2
        error = ((split.float() - whole.float()).abs().max() / whole.float().abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:
            return f"{name}: max error {error:.3g} relative to its largest value, above {tolerance:g}"
    return None


def is_split(param) -> bool:
    """Whether `param` is a stacked parameter as parallelize_module left it (not yet sharded by FSDP2)."""
    return getattr(param, SPLIT_MARK, False)


def local_call(op, args: tuple, kwargs: dict):
    """A routed linear called from a graph with plain per-rank tensors and a split (DTensor) weight: the input
    wrapped as the DTensor the weight's placement wants, the op run by DTensor's dispatch (the rules above),
    the per-rank output given back (module docstring)."""
    from torch.distributed.tensor import DTensor

    if op is not torch.ops.sparsify.routed_linear.default:
        raise SparsifyError(f"tensor parallel: {op._schema.name} got a split (DTensor) parameter; sparsify splits "
                            "only routed linears' weights and biases, so leave this op's parameters out of the plan")
    # routed_linear(x, modality_ids, weight, bias=None, backend="auto"), bound by hand: torch.compile cannot
    # trace reading the op's schema
    values = {"bias": None, "backend": "auto", **dict(zip(("x", "modality_ids", "weight", "bias", "backend"), args)),
              **kwargs}
    x, modality_ids, weight, bias, backend = (values[name] for name in ("x", "modality_ids", "weight", "bias",
                                                                        "backend"))
    mesh, placement = weight.device_mesh, weight.placements[0]
    row_wise = placement == Shard(2)
    x = DTensor.from_local(x, mesh, [Shard(x.ndim - 1) if row_wise else REPLICATE], run_check=False)
    modality_ids = DTensor.from_local(modality_ids, mesh, [REPLICATE], run_check=False)
    out = op(x, modality_ids, weight, bias, backend)
    if row_wise:
        out = out.redistribute(mesh, [REPLICATE])  # the partial sums all-reduced (identity in backward)
    return out.to_local()


# -- parameters applied to a rank's part of the features --------------------------------------------------
# A parameter left whole (replicated) but applied between a column-wise and a row-wise linear (a per-head
# q/k norm, a per-head scale) sees only this rank's heads: its gradient on each rank is a partial sum, and
# the replicas would drift apart. Found from the graph (below), such a read is wrapped in `sum_gradient`:
# identity forward, gradient summed over the tensor-parallel group in backward (transformers' tp_plan says
# "replicated_with_grad_allreduce" for these; here no plan has to).

class _SumGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group_name):
        ctx.group_name = group_name
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name)), None


def sum_gradient(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """`tensor`, whose gradient is summed over the process group named `group_name` in backward."""
    return _SumGradient.apply(tensor, group_name)


def split_kinds(routed: nn.Module) -> dict[str, str]:
    """{FQN as captured: 'colwise' | 'rowwise'} of the parameters parallelize_module split (a row-wise bias,
    left whole but added as a partial value by the routed linear, counts as row-wise)."""
    from sparsify import module_tree

    kinds = {}
    with module_tree.without_wrappers(routed):
        for name, param in routed.named_parameters(remove_duplicate=False):
            if is_split(param):
                kinds[name] = COLUMN_WISE if param.placements[0] == Shard(1) else ROW_WISE
    return kinds


def parameters_on_split_activations(graph: torch.fx.Graph, parameter_fqns: dict[str, str],
                                    split: dict[str, str]) -> set[str]:
    """FQNs of the parameters not split that `graph` applies to a rank's part of the features: a forward
    dataflow from each column-wise linear's output (per rank) up to each row-wise one's (whole again).
    `parameter_fqns`: {placeholder name: FQN}; `split`: split_kinds."""
    routed_linear = torch.ops.sparsify.routed_linear.default
    per_rank: set[torch.fx.Node] = set()
    from_parameters: dict[torch.fx.Node, set[str]] = {}  # nodes computed from parameters alone (casts, views)
    found: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in parameter_fqns:
            from_parameters[node] = {parameter_fqns[node.name]}
            continue
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        if node.target is routed_linear:
            kinds = {split.get(fqn) for fqn in from_parameters.get(node.args[2], ())}
            if COLUMN_WISE in kinds:
                per_rank.add(node)
                continue
            if ROW_WISE in kinds:
                continue  # all-reduced: whole again
        if any(i in per_rank for i in inputs):
            per_rank.add(node)
            found.update(fqn for i in inputs for fqn in from_parameters.get(i, ()) if fqn not in split)
        elif inputs and all(i in from_parameters for i in inputs):
            from_parameters[node] = set().union(*(from_parameters[i] for i in inputs))
    return found
