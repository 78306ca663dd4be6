"""Public API: convert, verify, save, load."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from sparsify import checkpoint, modality_split
from sparsify.capture import bind_call, capture, primary_tensor
from sparsify.errors import CaptureError, SparsifyError, VerificationError, reported
from sparsify import frontends
from sparsify.passes.verify import VerifyReport, compare_graphs
from sparsify.plan import INIT_MODES, RoutingPlan, build_plan
from sparsify.routed_model import RoutedModel
from sparsify.safetensors_io import write_checkpoint


MANY_MODALITIES = 16  # more than this is warned about (the papers route 2-3)
MAX_MODALITIES = 64  # more than this needs allow_many_modalities=True: likely a typo, and a big allocation


def _example_inputs(model: nn.Module, example_inputs, example_kwargs) -> dict[str, Any]:
    frontend = frontends.for_model(model)
    if example_inputs is None and example_kwargs is None:
        guessed = frontend.example_inputs(model) if frontend is not None else None
        if guessed is None:
            raise SparsifyError(
                f"sparsify cannot make example inputs for {type(model).__name__}: it is not a Hugging Face "
                "PreTrainedModel and shows no vocabulary (no config.vocab_size, no nn.Embedding) for token ids. "
                "Pass example_inputs=(tokens,) (and example_kwargs={...}) as you would call the model."
            )
        return guessed
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {**frontends.call_defaults(model), **dict(example_kwargs or {})}
    return bind_call(model, tuple(example_inputs or ()), kwargs)


def example_call(routed: RoutedModel) -> dict[str, Any]:
    """A routed model's example inputs: its conversion's, or for a model loaded from a checkpoint, made the way
    convert makes them."""
    return getattr(routed, "example_inputs", None) or _example_inputs(routed._dense, None, None)


def reinit_module(root: nn.Module, owner_fqn: str) -> None:
    """Re-initialise one module the way the dense model initialises it."""
    module = root.get_submodule(owner_fqn)
    if callable(getattr(root, "_init_weights", None)):  # Hugging Face PreTrainedModel
        root._init_weights(module)
    elif callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
    else:
        raise SparsifyError(
            f"init='independent' cannot re-initialise module '{owner_fqn}' ({type(module).__name__}): it has no "
            "reset_parameters() and the model no _init_weights(). Use init='copy', or add reset_parameters()."
        )


def _stack_parameters(dense: nn.Module, plan: RoutingPlan, init: str) -> None:
    """Replace each routed parameter [*S] by an [M, *S] parameter under the same FQN (and its aliases)."""
    modalities = plan.modalities
    copies: dict[str, torch.Tensor] = {}
    if init == "copy":
        for p in plan.params:
            dense_param = dense.get_parameter(p.fqn).detach()
            copies[p.fqn] = dense_param.unsqueeze(0).repeat(modalities, *[1] * dense_param.dim())
    elif init == "independent":
        routed = set(plan.routed)
        owners = sorted({fqn.rpartition(".")[0] for fqn in routed})
        # Re-initialising a module also resets its shared parameters: keep those as they are.
        keep = {}
        for owner in owners:
            for name, tensor in dense.get_submodule(owner).named_parameters(prefix=owner, recurse=False):
                if name not in routed:
                    keep[name] = tensor.detach().clone()
        per_modality: dict[str, list[torch.Tensor]] = {p.fqn: [] for p in plan.params}
        with torch.no_grad():
            for _ in range(modalities):
                for owner in owners:
                    reinit_module(dense, owner)
                for p in plan.params:
                    per_modality[p.fqn].append(dense.get_parameter(p.fqn).detach().clone())
            for fqn, value in keep.items():
                dense.get_parameter(fqn).copy_(value)
        copies = {fqn: torch.stack(values) for fqn, values in per_modality.items()}
    elif init == "empty":  # load() fills the values from the checkpoint
        for p in plan.params:
            dense_param = dense.get_parameter(p.fqn)
            copies[p.fqn] = dense_param.new_zeros((modalities, *dense_param.shape))
    else:
        raise SparsifyError(f"unknown init {init!r}; choose one of {', '.join(INIT_MODES)}")
    for p in plan.params:
        requires_grad = dense.get_parameter(p.fqn).requires_grad
        stacked = nn.Parameter(copies[p.fqn], requires_grad=requires_grad)
        for name in [p.fqn, *p.aliases]:
            owner, _, attr = name.rpartition(".")
            dense.get_submodule(owner)._parameters[attr] = stacked


@reported("sparsify.convert")
def convert(
    model: nn.Module,
    modalities: int = 3,
    *,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict | None = None,
    policy: str = "auto",
    include: str | None = None,
    exclude: str | None = None,
    init: str = "copy",
    verify: bool = True,
    inplace: bool = False,
    hoist: bool = True,
    frozen: int | list[int] | None = None,
    allow_many_modalities: bool = False,
) -> RoutedModel:
    """Turn a dense model into a modality-routed one.

    Args:
        model: the dense module (a Hugging Face causal LM, a mamba_ssm model, any traceable nn.Module).
        modalities: M, the number of modalities; each routed parameter gets M copies (more than 64 needs
            allow_many_modalities=True).
        example_inputs: positional inputs of one call, for capture; Hugging Face models and models that show a
            vocabulary need none. The first input tensor with >= 2 dims carries the tokens in its (batch, seq).
        example_kwargs: keyword inputs of that call.
        policy: which parameters to route: "auto" (per block: "mot" with attention, else "mom"), "mot" (block
            linears and norms), "mom" (block linears), "all" (every routable parameter) or "none".
        include: regex (re.search on parameter FQNs): also route these.
        exclude: regex: keep these shared.
        init: "copy" (every copy starts as the dense weight: equal to dense at init) or "independent" (each copy
            re-initialised as the model initialises itself).
        verify: compare the routed graph with the dense one on random inputs and modality ids (raises
            VerificationError on a mismatch; the report is `routed.verify_report`).
        inplace: reuse `model`'s module tree instead of a deep copy (saves memory; `model` is then routed).
        hoist: sort tokens by modality once per token-wise region of a block rather than in every routed op.
        frozen: modalities (an int or a list) whose copies do not train, as RoutedModel.freeze (upcycling).
        allow_many_modalities: allow modalities > 64.

    Returns:
        A RoutedModel: call it as the dense model with `modality_ids=` (LongTensor [batch, seq]) added.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, RoutedModel):
        raise SparsifyError("this model is already routed (a RoutedModel); convert the dense model instead")
    if any(p.is_meta for p in model.parameters()):
        raise SparsifyError(
            f"{type(model).__name__} has parameters on the meta device: convert needs their values (it runs the "
            "model to capture and verify it). Load the weights first (to_empty() then load_state_dict), or convert "
            "the saved checkpoint with `sparsify convert SRC -o DST`, which plans on meta and streams the tensors.")
    check_modality_count(modalities, allow_many_modalities)
    if frozen is not None:
        modality_split.check_modalities(modalities, frozen)  # before any work
    dense = model if inplace else copy.deepcopy(model)
    inputs = _example_inputs(dense, example_inputs, example_kwargs)
    # inputs a frontend made up: it checks the capture agrees with its guess
    guessed_by = frontends.for_model(dense) if example_inputs is None and example_kwargs is None else None
    try:
        captured = capture(dense, inputs)
    except CaptureError as e:
        note = guessed_by.capture_note(dense, inputs) if guessed_by is not None else None
        if note:
            e.add_note(note)
        raise
    if guessed_by is not None:
        guessed_by.check_capture(dense, captured, inputs)
    plan = build_plan(captured, dense, modalities, policy=policy, include=include, exclude=exclude, init=init)
    if not plan.params:
        raise SparsifyError(
            f"policy={policy!r} selected no parameters to route in {type(model).__name__}; the parameters and "
            "why they stay shared:\n" + "\n".join(f"  {p.fqn}: {p.reason}" for p in plan.shared)
            + "\nUse include=<regex> to pick parameters, or policy='all'."
        )
    for note in plan.notes:
        warnings.warn(f"sparsify: {note}", stacklevel=3)  # the caller of convert, past the @reported wrapper
    if modalities > MANY_MODALITIES:  # valid, but likely a typo: every routed weight is copied that many times
        routed_part, shared_part = plan.parameter_counts()
        dense_count, routed_count = routed_part + shared_part, routed_part * modalities + shared_part
        warnings.warn(f"sparsify: modalities={modalities} makes {modalities} copies of every routed parameter: "
                      f"{dense_count:,} -> {routed_count:,} parameters ({routed_count / max(dense_count, 1):.0f}x)",
                      stacklevel=3)
    _stack_parameters(dense, plan, init)
    routed = RoutedModel(dense, plan, frontends.call_defaults(dense))
    routed.hoist = hoist
    routed.example_inputs = inputs
    routed.seed_graph(inputs, captured)
    if verify:
        report = _verify_modalities(routed, inputs) if init == "independent" else \
            _verify(routed, inputs, dense_params=None, seed=0)
        routed.verify_report = report
        if not report.ok:
            raise VerificationError(f"the routed model does not match the dense one: {report}", report)
    if frozen is not None:
        routed.freeze(frozen)
    return routed


def check_modality_count(modalities, allow_many: bool) -> None:
    """Before any work: more than MAX_MODALITIES copies of every routed weight only when asked for."""
    if isinstance(modalities, int) and not isinstance(modalities, bool) and modalities > MAX_MODALITIES \
            and not allow_many:
        raise SparsifyError(
            f"modalities={modalities} would make {modalities} copies of every routed parameter (the papers route 2-3 "
            f"modalities); more than {MAX_MODALITIES} needs allow_many_modalities=True (the CLI: "
            "--allow-many-modalities)")


def _random_like(inputs: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random inputs with the structure, dtypes and value ranges of `inputs`."""
    generator = torch.Generator().manual_seed(seed)

    def rand(leaf):
        if not isinstance(leaf, torch.Tensor) or leaf.dtype == torch.bool or leaf.numel() == 0:
            return leaf
        if leaf.is_floating_point():
            return torch.randn(leaf.shape, generator=generator, dtype=torch.float32).to(leaf)
        low, high = int(leaf.min()), int(leaf.max())
        return torch.randint(low, high + 1, leaf.shape, generator=generator).to(leaf)

    return pytree.tree_map(rand, inputs)


def _verify(routed: RoutedModel, inputs: dict[str, Any], dense_params: dict | None, seed: int) -> VerifyReport:
    """init='copy': the routed graph with random modality ids vs the dense graph run with `dense_params`
    (default: modality 0's copies, which equal the dense weights at init)."""
    generator = torch.Generator().manual_seed(seed + 1)

    def runs(token_shape):
        ids = torch.randint(0, routed.plan.modalities, token_shape, generator=generator)
        params = dense_params or {fqn: routed.get_parameter(fqn)[0] for fqn in routed.plan.routed}
        yield ids, params, f"{routed.plan.modalities} modalities, random modality ids, tokens {token_shape}"

    return _compare(routed, inputs, seed, runs)


def _verify_modalities(routed: RoutedModel, inputs: dict[str, Any], seed: int = 0) -> VerifyReport:
    """init='independent': all tokens of modality m vs the dense graph run with modality m's copies."""
    def runs(token_shape):
        for m in range(routed.plan.modalities):
            yield (torch.full(token_shape, m, dtype=torch.long),
                   {fqn: routed.get_parameter(fqn)[m] for fqn in routed.plan.routed},
                   f"each of {routed.plan.modalities} modalities alone vs dense with that modality's weights")

    return _compare(routed, inputs, seed, runs)


def _compare(routed: RoutedModel, inputs: dict[str, Any], seed: int, runs) -> VerifyReport:
    """Run the dense and routed graphs of `routed` on random inputs like `inputs`, once per
    (modality ids, dense parameters, description) that runs(token_shape) yields; the worst report wins."""
    was_training = routed.training
    routed.eval()  # dropout would make the two runs differ
    try:
        inputs = _random_like(inputs, seed)
        token = primary_tensor(inputs)
        entry, flat = routed.graph_for(inputs)
        routed_args = routed.graph_args(entry.routed, flat)
        worst = None
        for ids, dense_params, checked in runs(tuple(token.shape[:2])):
            report = compare_graphs(entry.dense_graph_module, routed.graph_args(entry.routed, flat, dense_params),
                                    entry.routed.graph_module, routed_args + [ids.to(token.device)],
                                    len(entry.routed.mutated_buffers), checked=checked)
            if worst is None or not report.ok or report.max_rel_err > worst.max_rel_err:
                worst = report
            if not report.ok:
                break
        return worst
    finally:
        routed.train(was_training)


@reported("sparsify.verify")
def verify(model: nn.Module, routed: RoutedModel, example_inputs=None, seed: int = 0,
           example_kwargs: dict | None = None) -> VerifyReport:
    """Compare `routed` (random modality ids) with the dense `model` on random inputs like the examples.

    Holds at initialisation with init='copy': every copy equals the dense weight. A plan made with
    init='independent' has no dense equivalent: each modality alone is then checked against the
    dense graph run with that modality's copies.
    """
    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"verify(model, routed) takes a RoutedModel second, got {type(routed).__name__}")
    if routed.tensor_parallel_mesh is not None:
        raise SparsifyError("verify compares whole weights with the dense model's, but this routed model's linears "
                            "are split over tensor-parallel ranks (sparsify.parallelize_module): verify before "
                            "parallelizing")
    if example_inputs is None and example_kwargs is None:
        inputs = getattr(routed, "example_inputs", None) or _example_inputs(model, None, None)
    else:
        inputs = _example_inputs(model, example_inputs, example_kwargs)
    if routed.plan.init == "independent":
        return _verify_modalities(routed, inputs, seed)
    dense_params = {}
    for fqn in routed.plan.routed:
        try:
            param = model.get_parameter(fqn)
        except AttributeError:
            raise SparsifyError(f"the dense model has no parameter {fqn!r}: is it the model that was converted?") \
                from None
        expected = tuple(routed.get_parameter(fqn).shape[1:])
        if tuple(param.shape) != expected:
            raise SparsifyError(f"dense parameter {fqn!r} has shape {tuple(param.shape)}, the routed model's "
                                f"copies have {expected}: is it the model that was converted?")
        dense_params[fqn] = param
    shared = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n not in dense_params}
    return _verify(routed, inputs, {**shared, **dense_params}, seed)


# -- save / load ----------------------------------------------------------------------------------
@reported("sparsify.save")
def save(routed: RoutedModel, path, *, overwrite: bool = False,
         max_shard_bytes: int = checkpoint.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a routed checkpoint directory (see sparsify.checkpoint); nothing is left behind on failure."""
    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"save() takes a RoutedModel (from sparsify.convert), got {type(routed).__name__}")
    path = Path(path)
    with checkpoint.staged_directory(path, overwrite) as staging:
        write_checkpoint(staging, checkpoint.module_tensors(routed), max_shard_bytes)
        write_description(routed, staging)
    return path


def write_description(routed: RoutedModel, directory: Path) -> None:
    """Everything of a sparsify checkpoint but the tensors: sparsify.json (plan, versions) and the model's own
    files (config.json for a Hugging Face model)."""
    dense = routed._dense
    checkpoint.write_metadata(directory, checkpoint.make_metadata(
        routed.plan, checkpoint.describe_model(dense), routed.call_defaults, checkpoint.single_dtype(routed),
        routed.frozen_modalities))
    frontend = frontends.for_model(dense)
    if frontend is not None:
        frontend.write_files(dense, directory)


@reported("sparsify.consolidate")
def consolidate(checkpoint_dir, routed: RoutedModel, path, *, key: str | None = "model",
                overwrite: bool = False) -> Path:
    """Turn a torch.distributed.checkpoint (DCP) directory of a sharded routed model into a `sparsify.save`
    directory that `sparsify.load` reads.

    `routed` is a routed model of the same plan (from `convert` or `load`, unsharded, any values): the
    checkpoint's tensors are loaded into it (they replace its values) and it is saved. `key` names the
    entry the model's state dict was saved under (`dcp.save({"model": get_model_state_dict(model)}, ...)`);
    None for a state dict saved at the top level. Runs in one process, without a process group.
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"consolidate() takes a RoutedModel as the template, got {type(routed).__name__}")
    tensors = {name: tensor.detach().clone() for name, tensor in routed.state_dict().items()}
    state = {key: tensors} if key is not None else tensors
    try:
        dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    except Exception as e:  # DCP raises several types for a missing or mismatching entry
        raise SparsifyError(f"cannot read {checkpoint_dir} as a distributed checkpoint of this routed model "
                            f"(key={key!r}): {type(e).__name__}: {str(e).strip()[:500]}") from None
    with torch.no_grad():
        routed.load_state_dict(tensors)
    return save(routed, path, overwrite=overwrite)


@reported("sparsify.load")
def load(path, model: nn.Module | Callable[[], nn.Module] | None = None) -> RoutedModel:
    """Rebuild a routed model saved by `save` or `sparsify convert`, in eval mode. Hugging Face models need
    no `model`; others pass the dense module (it is copied, not modified) or a factory that builds it."""
    path = Path(path)
    metadata = checkpoint.read_metadata(path)
    plan = RoutingPlan.from_dict(metadata["plan"])
    dense, _ = checkpoint.build_dense(metadata["model"], model)
    checkpoint.check_plan_matches(plan, dense, path)
    _stack_parameters(dense, plan, "empty")
    routed = RoutedModel(dense, plan, metadata.get("call_defaults") or {})
    if metadata.get("dtype"):
        routed.to(getattr(torch, metadata["dtype"]))
    checkpoint.load_weights(routed, path)
    if metadata.get("frozen_modalities"):
        routed.freeze(metadata["frozen_modalities"])
    return routed.eval()  # as from_pretrained does: call .train() to train
