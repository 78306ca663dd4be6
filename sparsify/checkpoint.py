"""The routed checkpoint format shared by `sparsify.save`/`load` and the CLI.

A directory holding
- model.safetensors (or shards + model.safetensors.index.json): every tensor under
  its dense FQN, routed ones stacked [M, *S]; tied weights stored once;
- sparsify.json: format version, versions, modalities, the RoutingPlan, how to
  rebuild the dense model (a Hugging Face class and config, or a module class name
  that the caller supplies), call defaults and dtype;
- config.json for Hugging Face models.
Directories are written under a temporary name and renamed into place.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparsify.errors import SparsifyError
from sparsify import frontends
from sparsify.plan import RoutingPlan
from sparsify.safetensors_io import OutputTensor, read_checkpoint_dir, read_tensor

FORMAT_VERSION = 1
METADATA_FILE = "sparsify.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for package in ("sparsify", "transformers", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def describe_model(dense: nn.Module) -> dict[str, Any]:
    """How to rebuild the dense model: its frontend's code-free description, else its class (load then needs
    the module or a factory)."""
    frontend = frontends.for_model(dense)
    description = frontend.describe(dense) if frontend is not None else None
    return description or {"kind": "module", "class": f"{type(dense).__module__}:{type(dense).__qualname__}"}


def make_metadata(plan: RoutingPlan, model: dict, call_defaults: dict, dtype: torch.dtype | None,
                  frozen: list[int] = ()) -> dict:
    return {
        "format": "sparsify",
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "modalities": plan.modalities,
        "plan": plan.to_dict(),
        "model": model,
        "call_defaults": call_defaults,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "frozen_modalities": list(frozen),  # RoutedModel.freeze; absent in checkpoints written before it
    }


def read_metadata(path) -> dict:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not path.exists():
        raise SparsifyError(f"{path} does not exist: give the directory sparsify.save or `sparsify convert` wrote")
    if not meta_file.is_file():
        raise SparsifyError(f"{path} is not a sparsify checkpoint: it has no {METADATA_FILE} "
                            "(write one with sparsify.save(routed, path) or `sparsify convert`)")
    try:
        metadata = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyError(f"{meta_file} is corrupted (not valid JSON: {e}); re-save the model") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "sparsify" or "plan" not in metadata:
        raise SparsifyError(f"{meta_file} is not sparsify metadata (no format/plan fields)")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise SparsifyError(f"{path} was written by a newer sparsify (format {metadata['format_version']}); "
                            "upgrade sparsify to load it")
    return metadata


def build_dense(description: dict, model=None) -> tuple[nn.Module, Any]:
    """(dense module, example inputs or None): from `model` (see dense_from) or, when it is None,
    from a checkpoint's Hugging Face description."""
    if model is not None:
        return dense_from(model)
    frontend = frontends.by_name(description.get("kind", ""))
    if frontend is None or frontend.rebuild is None:
        raise SparsifyError(f"the checkpoint holds a {description.get('class')} model, which sparsify cannot "
                            "rebuild on its own: pass the dense module or a factory that builds it")
    return frontend.rebuild(description), None


def dense_from(model) -> tuple[nn.Module, Any]:
    """A copy of a dense module, or what a factory builds: the module or (module, example_inputs)."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model), None
    if not callable(model):
        raise SparsifyError(f"model must be an nn.Module or a factory, got {type(model).__name__}")
    built = model()
    example = None
    if isinstance(built, tuple) and len(built) == 2:
        built, example = built
    if not isinstance(built, nn.Module):
        raise SparsifyError(f"the model factory returned {type(built).__name__}, not an nn.Module "
                            "(or a (module, example_inputs) pair)")
    return built, example


def module_tensors(module: nn.Module) -> list[OutputTensor]:
    """The state dict as OutputTensors, each tied tensor once (under its first name)."""
    seen: set[tuple] = set()
    out = []
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        flat = tensor.detach().reshape(-1)
        out.append(OutputTensor(name, tensor.dtype, tuple(tensor.shape), lambda flat=flat: iter([flat])))
    return out


def check_tensors_match(module: nn.Module, shapes: dict[str, tuple], where, hint: str = "") -> None:
    """Raise unless `shapes` (name -> shape) are exactly the module's state dict: every key present (a tied
    tensor once, under any of its names), nothing extra, shapes equal."""
    expected = module.state_dict(keep_vars=True)
    unexpected = sorted(set(shapes) - set(expected))
    present_ids = {id(expected[name]) for name in shapes if name in expected}
    missing = sorted(name for name in set(expected) - set(shapes) if id(expected[name]) not in present_ids)
    what = f"{where} does not match {type(module).__name__}"
    if unexpected or missing:
        raise SparsifyError(
            f"{what}: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "") + hint
        )
    for name, shape in shapes.items():
        if tuple(expected[name].shape) != tuple(shape):
            raise SparsifyError(f"{what}: {name!r} is {list(shape)} in the checkpoint but "
                                f"{list(expected[name].shape)} in the model{hint}")


def load_weights(module: nn.Module, directory: Path) -> None:
    """Load a directory's tensors into `module`, strictly (see check_tensors_match)."""
    entries = read_checkpoint_dir(directory)
    check_tensors_match(module, {name: entry.shape for name, entry in entries.items()}, f"checkpoint {directory}")
    expected = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, entry in entries.items():
            expected[name].copy_(read_tensor(entry))


def check_new_path(path, overwrite: bool) -> None:
    """An output path must not exist unless the caller says overwrite (checked again when writing)."""
    if Path(path).exists() and not overwrite:
        raise SparsifyError(f"{path} already exists; choose a new path or pass overwrite (--overwrite)")


@contextmanager
def staged_directory(path: Path, overwrite: bool):
    """Yield a temporary directory beside `path`, renamed to `path` only if the block succeeds."""
    path = Path(path)
    check_new_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_metadata(directory: Path, metadata: dict) -> None:
    (Path(directory) / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def single_dtype(module: nn.Module) -> torch.dtype | None:
    dtypes = {p.dtype for p in module.parameters()}
    return dtypes.pop() if len(dtypes) == 1 else None


def check_plan_matches(plan: RoutingPlan, dense: nn.Module, where) -> None:
    for p in plan.params:
        try:
            shape = list(dense.get_parameter(p.fqn).shape)
        except AttributeError:
            raise SparsifyError(f"checkpoint {where} does not match the model: it routes {p.fqn!r}, "
                                f"which {type(dense).__name__} does not have") from None
        if shape != p.shape:
            raise SparsifyError(f"checkpoint {where} does not match the model: {p.fqn!r} is {p.shape} in the "
                                f"checkpoint but {shape} in {type(dense).__name__}")

