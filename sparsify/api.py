"""Public API: convert, verify, save, load."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from sparsify.capture import bind_call, capture, primary_tensor
from sparsify.errors import SparsifyError, VerificationError
from sparsify.frontends import huggingface as hf
from sparsify.passes.verify import VerifyReport, compare_graphs
from sparsify.plan import INIT_MODES, RoutingPlan, build_plan
from sparsify.routed_model import RoutedModel

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "sparsify.json"


def _example_inputs(model: nn.Module, example_inputs, example_kwargs) -> dict[str, Any]:
    if example_inputs is None and example_kwargs is None:
        if hf.is_hf_model(model):
            return hf.example_inputs(model)
        raise SparsifyError(
            f"{type(model).__name__} is not a Hugging Face PreTrainedModel, so sparsify cannot make example "
            "inputs for it: pass example_inputs=(tokens,) (and example_kwargs={...}) as you would call the model."
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if hf.is_hf_model(model):
        kwargs = {**hf.call_defaults(model), **kwargs}
    return bind_call(model, tuple(example_inputs or ()), kwargs)


def _reinit(root: nn.Module, owner_fqn: str) -> None:
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
                    _reinit(dense, owner)
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


def convert(
    model: nn.Module,
    modalities: int = 3,
    *,
    example_inputs=None,
    example_kwargs: dict | None = None,
    policy: str = "auto",
    include: str | None = None,
    exclude: str | None = None,
    init: str = "copy",
    verify: bool = True,
    inplace: bool = False,
) -> RoutedModel:
    """Turn a dense model into a modality-routed one. See README for the arguments."""
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, RoutedModel):
        raise SparsifyError("this model is already routed (a RoutedModel); convert the dense model instead")
    build_plan_args = dict(modalities=modalities, policy=policy, include=include, exclude=exclude, init=init)
    dense = model if inplace else copy.deepcopy(model)
    inputs = _example_inputs(dense, example_inputs, example_kwargs)
    captured = capture(dense, inputs)
    plan = build_plan(captured, dense, **build_plan_args)
    if not plan.params:
        raise SparsifyError(
            f"policy={policy!r} selected no parameters to route in {type(model).__name__}; the parameters and "
            "why they stay shared:\n" + "\n".join(f"  {p.fqn}: {p.reason}" for p in plan.shared)
            + "\nUse include=<regex> to pick parameters, or policy='all'."
        )
    _stack_parameters(dense, plan, init)
    routed = RoutedModel(dense, plan, hf.call_defaults(dense) if hf.is_hf_model(dense) else {})
    routed.example_inputs = inputs
    routed.seed_graph(inputs, captured)
    if verify:
        report = _verify_modalities(routed, inputs) if init == "independent" else \
            _verify(routed, inputs, dense_params=None, seed=0)
        routed.verify_report = report
        if not report.ok:
            raise VerificationError(f"the routed model does not match the dense one: {report}", report)
    return routed


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
    """Routed graph with random modality ids vs dense graph with `dense_params` (default: modality 0's copy)."""
    was_training = routed.training
    routed.eval()  # dropout would make the two runs differ
    try:
        inputs = _random_like(inputs, seed)
        token = primary_tensor(inputs)
        generator = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(0, routed.plan.modalities, tuple(token.shape[:2]), generator=generator).to(token.device)
        entry, flat = routed.graph_for(inputs)
        if dense_params is None:
            dense_params = {fqn: routed.get_parameter(fqn)[0] for fqn in routed.plan.routed}
        dense_args = routed.graph_args(entry.routed, flat, params=dense_params)
        routed_args = routed.graph_args(entry.routed, flat) + [ids]
        return compare_graphs(entry.dense_graph_module, dense_args, entry.routed.graph_module, routed_args,
                              len(entry.routed.mutated_buffers),
                              checked=f"{routed.plan.modalities} modalities, random modality ids, "
                                      f"tokens {tuple(token.shape[:2])}")
    finally:
        routed.train(was_training)


def _verify_modalities(routed: RoutedModel, inputs: dict[str, Any], seed: int = 0) -> VerifyReport:
    """For init='independent': all tokens of modality m == the dense graph run with modality m's copies."""
    was_training = routed.training
    routed.eval()
    try:
        inputs = _random_like(inputs, seed)
        token = primary_tensor(inputs)
        entry, flat = routed.graph_for(inputs)
        worst = None
        for m in range(routed.plan.modalities):
            ids = torch.full(tuple(token.shape[:2]), m, dtype=torch.long, device=token.device)
            dense_params = {fqn: routed.get_parameter(fqn)[m] for fqn in routed.plan.routed}
            report = compare_graphs(
                entry.dense_graph_module, routed.graph_args(entry.routed, flat, params=dense_params),
                entry.routed.graph_module, routed.graph_args(entry.routed, flat) + [ids],
                len(entry.routed.mutated_buffers),
                checked=f"each of {routed.plan.modalities} modalities alone vs dense with that modality's weights",
            )
            if worst is None or report.max_rel_err > worst.max_rel_err or not report.ok:
                worst = report
                if not report.ok:
                    break
        return worst
    finally:
        routed.train(was_training)


def verify(model: nn.Module, routed: RoutedModel, example_inputs=None, seed: int = 0,
           example_kwargs: dict | None = None) -> VerifyReport:
    """Compare `routed` (random modality ids) with the dense `model` on random inputs like the examples.

    Holds at initialisation with init='copy': every copy equals the dense weight.
    """
    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"verify(model, routed) takes a RoutedModel second, got {type(routed).__name__}")
    if example_inputs is None and example_kwargs is None:
        inputs = getattr(routed, "example_inputs", None) or _example_inputs(model, None, None)
    else:
        inputs = _example_inputs(model, example_inputs, example_kwargs)
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
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for package in ("sparsify", "transformers", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def save(routed: RoutedModel, path, *, overwrite: bool = False) -> Path:
    """Write a directory: model.safetensors (stacked weights under dense FQNs), sparsify.json, config.json (HF)."""
    from safetensors.torch import save_model

    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"save() takes a RoutedModel (from sparsify.convert), got {type(routed).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise SparsifyError(f"{path} already exists; choose a new path or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    dense = routed._dense
    dtypes = {p.dtype for p in routed.parameters()}
    metadata = {
        "format": "sparsify",
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "modalities": routed.plan.modalities,
        "plan": routed.plan.to_dict(),
        "model": hf.describe(dense) if hf.is_hf_model(dense) else
        {"kind": "module", "class": f"{type(dense).__module__}:{type(dense).__qualname__}"},
        "call_defaults": routed.call_defaults,
        "dtype": str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None,
    }
    # Written next to the target and renamed into place, so a failure leaves no half-written directory.
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        save_model(routed, str(staging / WEIGHTS_FILE))
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if hf.is_hf_model(dense):
            dense.config.save_pretrained(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_metadata(path) -> dict:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise SparsifyError(f"{path} is not a sparsify checkpoint: it has no {METADATA_FILE} "
                            "(write one with sparsify.save(routed, path))")
    try:
        metadata = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyError(f"{meta_file} is corrupted (not valid JSON: {e}); re-save the model") from None
    if metadata.get("format") != "sparsify" or "plan" not in metadata:
        raise SparsifyError(f"{meta_file} is not sparsify metadata (no format/plan fields)")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise SparsifyError(f"{path} was written by a newer sparsify (format {metadata['format_version']}); "
                            "upgrade sparsify to load it")
    return metadata


def load(path, model: nn.Module | Callable[[], nn.Module] | None = None) -> RoutedModel:
    """Rebuild a routed model saved by `save`, in eval mode. Hugging Face models need no `model`; others
    pass the dense module (it is copied, not modified) or a factory that builds it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    metadata = read_metadata(path)
    plan = RoutingPlan.from_dict(metadata["plan"])
    if model is None:
        if metadata["model"].get("kind") != "huggingface":
            raise SparsifyError(f"{path} holds a {metadata['model'].get('class')} model, which sparsify cannot "
                                "rebuild on its own: pass model=<the dense module> or a factory to load()")
        dense = hf.rebuild(metadata["model"])
    elif isinstance(model, nn.Module):
        dense = copy.deepcopy(model)
    elif callable(model):
        dense = model()
        if not isinstance(dense, nn.Module):
            raise SparsifyError(f"the model factory returned {type(dense).__name__}, not an nn.Module")
    else:
        raise SparsifyError(f"model must be an nn.Module or a factory, got {type(model).__name__}")
    for p in plan.params:
        try:
            shape = list(dense.get_parameter(p.fqn).shape)
        except AttributeError:
            raise SparsifyError(f"checkpoint {path} does not match the model: it routes {p.fqn!r}, "
                                f"which {type(dense).__name__} does not have") from None
        if shape != p.shape:
            raise SparsifyError(f"checkpoint {path} does not match the model: {p.fqn!r} is {p.shape} in the "
                                f"checkpoint but {shape} in {type(dense).__name__}")
    _stack_parameters(dense, plan, "empty")
    routed = RoutedModel(dense, plan, metadata.get("call_defaults") or {})
    if metadata.get("dtype"):
        routed.to(getattr(torch, metadata["dtype"]))
    try:
        load_model(routed, str(path / WEIGHTS_FILE), strict=True)
    except FileNotFoundError:
        raise SparsifyError(f"{path} has no {WEIGHTS_FILE}: the checkpoint is incomplete") from None
    except SafetensorError as e:
        raise SparsifyError(f"{path / WEIGHTS_FILE} is corrupted or truncated ({e}); re-save the model") from None
    except RuntimeError as e:
        raise SparsifyError(f"checkpoint {path} does not match the model: {str(e).strip()[:1500]}") from None
    return routed.eval()  # as from_pretrained does: call .train() to train
