"""Convert a dense checkpoint on disk into a routed one, streaming tensors one chunk at a time.

The model is built on the meta device and captured there to plan, so no weight
is loaded to decide what to route. Each source tensor is then copied to the
output in bounded chunks (a routed one M times, or re-initialised per modality
module by module), so peak memory stays far below the checkpoint size.
"""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from sparsify import checkpoint
from sparsify.capture import bind_call, capture
from sparsify.errors import CaptureError, SparsifyError, VerificationError
from sparsify import frontends
from sparsify.frontends import huggingface as hf  # SRC may be a Hugging Face model directory
from sparsify.plan import RoutingPlan, build_plan
from sparsify.safetensors_io import (INDEX_FILE, OutputTensor, iter_chunks, read_checkpoint_dir, read_header,
                                     write_checkpoint)

DTYPE_CHOICES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DenseSource:
    """A dense checkpoint: its tensors (read lazily), and how to build its module."""

    path: Path
    tensors: dict[str, OutputTensor]
    hf_config_dir: Path | None  # a Hugging Face model directory (config.json) or None

    def build(self, factory: Callable | None, device: str) -> tuple[nn.Module, Any]:
        """(module with uninitialised weights on `device`, example inputs or None)."""
        with torch.device(device):
            if factory is not None:
                return checkpoint.dense_from(factory)
            if self.hf_config_dir is None:
                raise SparsifyError(f"{self.path} is a plain state dict: name the module that loads it with "
                                    "--model package.module:factory")
            return build_hf(self.hf_config_dir), None


def load_factory(spec: str | None) -> Callable | None:
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SparsifyError(f"--model {spec!r} must look like package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SparsifyError(f"cannot import the model factory {spec!r}: {e}") from None
    if not callable(factory):
        raise SparsifyError(f"--model {spec!r} is not callable")
    return factory


def build_hf(directory: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise SparsifyError("reading a Hugging Face model directory needs transformers: pip install transformers") \
            from None
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise SparsifyError(f"{directory}/config.json names no architecture transformers knows "
                            f"({architectures}); pass --model package.module:factory")
    return cls(config)


def open_source(path) -> DenseSource:
    path = Path(path)
    if not path.exists():
        raise SparsifyError(f"{path} does not exist")
    if path.is_dir() and (path / checkpoint.METADATA_FILE).exists():
        raise SparsifyError(f"{path} is already routed (it has {checkpoint.METADATA_FILE}); convert the dense "
                            "checkpoint instead, or use `sparsify inspect` to see its plan")
    if path.is_dir():
        entries = read_checkpoint_dir(path)
        tensors = {n: OutputTensor(n, e.dtype, e.shape, lambda e=e: iter_chunks(e), copies_of=e)
                   for n, e in entries.items()}
        return DenseSource(path, tensors, path if (path / "config.json").is_file() else None)
    if path.suffix == ".safetensors":
        tensors = {e.name: OutputTensor(e.name, e.dtype, e.shape, lambda e=e: iter_chunks(e), copies_of=e)
                   for e in read_header(path)}
        return DenseSource(path, tensors, None)
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            # weights_only: a checkpoint never runs code; mmap: tensors are paged in as they are copied.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise SparsifyError(f"cannot read {path} as a weights-only torch state dict: {str(e).strip()[:500]}") \
                from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SparsifyError(f"{path} is not a state dict of tensors")
        tensors = {n: OutputTensor(n, t.dtype, tuple(t.shape), lambda t=t: iter([t.reshape(-1)]))
                   for n, t in state.items()}
        return DenseSource(path, tensors, None)
    raise SparsifyError(f"{path}: expected a Hugging Face model directory, a .safetensors file or a .pt state dict")


def plan_for(source: DenseSource, factory, modalities, policy, include, exclude, init) -> tuple[RoutingPlan, nn.Module, Any]:
    """Build the dense module on the meta device, capture it there and plan."""
    dense, example = source.build(factory, "meta")
    dense.eval()
    checkpoint.check_tensors_match(dense, {n: t.shape for n, t in source.tensors.items()}, source.path,
                                   "; is --model (or config.json) the architecture of this checkpoint?")
    if example is None:
        if not hf.is_hf_model(dense):
            raise SparsifyError("the model factory must return (module, example_inputs) so sparsify can capture it")
        inputs = hf.example_inputs(dense)
    else:
        inputs = bind_call(dense, tuple(example) if isinstance(example, (tuple, list)) else (example,), {})
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # A plan needs no dynamic dims: which parameters are routed is decided by what the graph does with them
    # (route finds the token axes again on the routed model's own dynamic capture). A static export takes
    # less than half the time (5.7 -> 2.1 s for a 20-layer Llama, the largest fixed cost of a conversion).
    # Only where token provenance knew nothing about a use do sizes decide its axes, and a static size may
    # then equal a feature size: such a plan is made again from the dynamic capture. (Node names quoted in
    # the plan's notes are the static graph's.)
    for static in (True, False):
        try:
            captured = capture(dense, inputs, static=static)
        except CaptureError:
            if not static:
                raise
            continue  # say what the dynamic capture says
        plan = build_plan(captured, dense, modalities, policy=policy, include=include, exclude=exclude, init=init)
        if not any(use.axes_from_sizes for uses in captured.param_uses.values() for use in uses):
            break
    if not plan.params:
        raise SparsifyError(f"policy={policy!r} routes no parameter of {type(dense).__name__}; "
                            "use --include REGEX or --policy all")
    return plan, dense, example


def _routed_chunks(source: OutputTensor, modalities: int) -> Callable[[], Iterator[torch.Tensor]]:
    def chunks():
        for _ in range(modalities):
            yield from source.chunks()
    return chunks


def _independent_chunks(dense_meta: nn.Module, fqn: str, modalities: int) -> Callable[[], Iterator[torch.Tensor]]:
    """Each modality's copy freshly initialised the way the model initialises the owning module."""
    from sparsify.api import reinit_module

    owner_name, _, attr = fqn.rpartition(".")

    def chunks():
        owner = dense_meta.get_submodule(owner_name)
        owner.to_empty(device="cpu", recurse=False)
        try:
            for _ in range(modalities):
                with torch.no_grad():
                    reinit_module(dense_meta, owner_name)
                yield owner._parameters[attr].detach().reshape(-1).clone()
        finally:
            owner.to("meta")
    return chunks


def materialize(source: DenseSource, factory) -> tuple[nn.Module, Any]:
    """The dense model with its real weights (for verification), on CPU."""
    dense, example = source.build(factory, "cpu")
    state = {n: torch.cat(list(t.chunks())).reshape(t.shape) for n, t in source.tensors.items()}
    dense.load_state_dict(state, strict=False)
    if hf.is_hf_model(dense):
        dense.tie_weights()
    return dense.eval(), example


def convert_checkpoint(src, dst, *, modalities: int, policy: str = "auto", include=None, exclude=None,
                       init: str = "copy", dtype: str = "keep", verify: bool = True, model: str | None = None,
                       overwrite: bool = False, max_shard_bytes: int = checkpoint.DEFAULT_MAX_SHARD_BYTES,
                       progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Returns {"plan", "report" (or None), "files"}; raises SparsifyError / VerificationError.

    `progress(total_bytes)` is called once the output size is known and returns a callback
    that receives the number of bytes written after each chunk.
    """
    if dtype not in DTYPE_CHOICES:
        raise SparsifyError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    factory = load_factory(model)
    source = open_source(src)
    plan, dense_meta, _ = plan_for(source, factory, modalities, policy, include, exclude, init)
    out_dtype = DTYPE_CHOICES[dtype]
    routed = set(plan.routed)
    outputs = []
    for name, tensor in source.tensors.items():
        cast = out_dtype if out_dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        if name in routed:
            if init == "independent":
                outputs.append(OutputTensor(name, cast, (modalities, *tensor.shape),
                                            _independent_chunks(dense_meta, name, modalities)))
            else:
                outputs.append(OutputTensor(name, cast, (modalities, *tensor.shape),
                                            _routed_chunks(tensor, modalities), tensor.copies_of))
        else:
            outputs.append(OutputTensor(name, cast, tensor.shape, tensor.chunks, tensor.copies_of))
    float_dtypes = {t.dtype for t in outputs if t.dtype.is_floating_point}
    metadata = checkpoint.make_metadata(
        plan, checkpoint.describe_model(dense_meta), frontends.call_defaults(dense_meta),
        float_dtypes.pop() if len(float_dtypes) == 1 else None)
    if not hf.is_hf_model(dense_meta):
        metadata["model"]["factory"] = model
    report = None
    with checkpoint.staged_directory(Path(dst), overwrite) as staging:
        update = progress(sum(t.nbytes for t in outputs)) if progress else None
        files = write_checkpoint(staging, outputs, max_shard_bytes, update)
        checkpoint.write_metadata(staging, metadata)
        if source.hf_config_dir is not None:
            for extra in source.hf_config_dir.iterdir():  # config, generation config, tokenizer files
                if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX_FILE:
                    shutil.copy2(extra, staging / extra.name)
        if verify:
            report = verify_dirs(source, staging, factory, out_dtype)
            if not report.ok:
                raise VerificationError(f"the converted checkpoint does not match the dense one: {report}", report)
    return {"plan": plan, "report": report, "files": files}


def verify_dirs(source: DenseSource, routed_dir: Path, factory, dtype: torch.dtype | None):
    import sparsify

    dense, example = materialize(source, factory)
    if dtype is not None:
        dense.to(dtype)
    routed = sparsify.load(routed_dir, model=factory)
    return sparsify.verify(dense, routed, example_inputs=example)


def describe_source(src, model: str | None, modalities: int, policy: str, include, exclude) -> str:
    source = open_source(src)
    plan, dense, _ = plan_for(source, load_factory(model), modalities, policy, include, exclude, "copy")
    return f"{src}: dense {type(dense).__name__}; converting would route:\n{plan.summary()}"
