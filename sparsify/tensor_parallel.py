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
_PLACEMENTS = {(COLUMN_WISE, "weight"): Shard(1), (COLUMN_WISE, "bias"): Shard(1),
               (ROW_WISE, "weight"): Shard(2), (ROW_WISE, "bias"): REPLICATE}
MARK = "_sparsify_tensor_parallel"  # set on the Parameters parallelize_module made (FSDP2 replaces them)


def _style(style, key: str) -> str:
    """'colwise' or 'rowwise' for one plan entry: torch's ColwiseParallel / RowwiseParallel with their default
    layouts, or transformers' tp_plan strings."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style in (COLUMN_WISE, ROW_WISE):
        return style
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


def parallelize_module(module: nn.Module, device_mesh, parallelize_plan: dict, *, routed: nn.Module | None = None,
                       check: bool = True):
    """torch.distributed.tensor.parallel.parallelize_module for the routed linears of a routed model.

    `parallelize_plan`: {module path relative to `module` (fnmatch wildcards, as torch's: "layers.*.mlp.up_proj"):
    ColwiseParallel() | RowwiseParallel() | "colwise" | "rowwise"}, e.g. the pairs q/k/v then o, gate/up then
    down. Each matched module's stacked parameters become DTensors on `device_mesh` (1-D) split along the
    style's feature dim (module docstring); everything else stays as it is, replicated. Then, as for FSDP2,
    capture before sharding with FSDP2 (routed.precapture): graphs are captured on the local shards. Returns
    `module`.

    A plan can be wrong for the model in ways no shape shows: a fused q/k/v projection split column-wise and then
    chunked, attention over whole features rather than heads. `check` (default) runs the routed model on its
    example inputs (eval mode, fixed random modality ids) before and after splitting, on every rank, and
    undoes the split with a SparsifyError where the outputs differ. Skipped for parameters on the meta device."""
    from torch.distributed.tensor import distribute_tensor

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
    before = _example_outputs(routed) if check else None
    replaced: dict[int, nn.Parameter] = {}  # a weight tied between two modules stays one tensor
    undo: list[tuple[nn.Module, str, nn.Parameter]] = []
    for key, style in parallelize_plan.items():
        kind = _style(style, key)
        matched = [(name, sub) for name, sub in module.named_modules() if name and fnmatch.fnmatchcase(name, key)]
        if not matched:
            raise SparsifyError(f"tensor parallel plan entry '{key}' matches no submodule of "
                                f"{type(module).__name__}")
        for name, target in matched:
            for param_name, param in list(target.named_parameters(recurse=False)):
                placement = _PLACEMENTS.get((kind, param_name))
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
                setattr(split, MARK, True)
                replaced[id(param)] = split
                undo.append((target, param_name, param))
                target.register_parameter(param_name, split)
    routed.__dict__["_tensor_parallel_mesh"] = device_mesh
    routed._graphs.clear()  # captured on whole weights; the next call captures on this rank's shards
    if check:
        try:
            problem = _difference(before, _example_outputs(routed))
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


def _undo(routed, undo: list) -> None:
    """Give the split modules their whole parameters back (a plan the check refused)."""
    for target, param_name, param in reversed(undo):
        target.register_parameter(param_name, param)
    del routed.__dict__["_tensor_parallel_mesh"]
    routed._graphs.clear()


def _example_outputs(routed) -> list[torch.Tensor]:
    """The routed model's floating-point outputs on its example inputs, eval mode, fixed random modality ids
    (the same on every rank)."""
    import torch.utils._pytree as pytree

    from sparsify.api import example_call
    from sparsify.capture import primary_tensor

    inputs = example_call(routed)
    shape = primary_tensor(inputs).shape[:2]
    ids = torch.randint(0, routed.plan.modalities, tuple(shape), generator=torch.Generator().manual_seed(0))
    was_training = routed.training
    routed.eval()
    try:
        with torch.no_grad():
            outputs = routed(**inputs, modality_ids=ids.to(primary_tensor(inputs).device))
    finally:
        routed.train(was_training)
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _difference(before: list[torch.Tensor], after: list[torch.Tensor]) -> str | None:
    """Where the split model's outputs differ from the whole model's beyond reduction-order error, or None."""
    for index, (whole, split) in enumerate(zip(before, after)):
        # a row-wise linear sums partial products in another order: float error only
        tolerance = 1e-4 if whole.dtype == torch.float32 or whole.dtype == torch.float64 else 2e-2
        error = ((split.float() - whole.float()).abs().max() / whole.float().abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:
            return f"output {index}: max error {error:.3g} relative to its largest value, above {tolerance:g}"
    return None


def is_split(param) -> bool:
    """Whether `param` is a stacked parameter as parallelize_module left it (not yet sharded by FSDP2)."""
    return getattr(param, MARK, False)


def local_call(op, args: tuple, kwargs: dict):
    """A routed linear called from a graph with plain per-rank tensors and a split (DTensor) weight: the input
    wrapped as the DTensor the weight's placement wants, the op run by DTensor's dispatch (the rules above),
    the per-rank output given back (module docstring)."""
    from torch.distributed.tensor import DTensor

    from sparsify.ops.eager import bind

    if op is not torch.ops.sparsify.routed_linear.default:
        raise SparsifyError(f"tensor parallel: {op._schema.name} got a split (DTensor) parameter; sparsify splits "
                            "only routed linears' weights and biases, so leave this op's parameters out of the plan")
    x, modality_ids, weight, bias, backend = bind(op, args, kwargs)
    mesh, placement = weight.device_mesh, weight.placements[0]
    row_wise = placement == Shard(2)
    x = DTensor.from_local(x, mesh, [Shard(x.ndim - 1) if row_wise else REPLICATE], run_check=False)
    modality_ids = DTensor.from_local(modality_ids, mesh, [REPLICATE], run_check=False)
    out = op(x, modality_ids, weight, bias, backend)
    if row_wise:
        out = out.redistribute(mesh, [REPLICATE])  # the partial sums all-reduced (identity in backward)
    return out.to_local()
