"""After training: one modality's weights back in the dense class, and the routed model as a .pt2 program.

    extract(routed, modality=k)  =>  the dense model's class, every routed weight replaced by copy k
    export(routed, path)         =>  torch.export .pt2 of the routed graph, modality_ids its last input

The exported program is called as the routed model is (`program.module()(input_ids, modality_ids=ids)`: the
call defaults such as use_cache=False are in it) and returns plain containers (a model output's fields as a
dict), so it loads in any process after `import sparsify`, whatever library defined the model's output class.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, ExportGraphSignature

from sparsify import module_tree
from sparsify.api import example_call
from sparsify.errors import SparsifyError
from sparsify.passes.route import MODALITY_IDS
from sparsify.routed_model import RoutedModel


def _check_routed(routed, what: str) -> None:
    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"{what}() takes a RoutedModel (from sparsify.convert or sparsify.load), "
                            f"got {type(routed).__name__}")


def extract(routed: RoutedModel, modality: int) -> nn.Module:
    """A dense model of the original class holding modality `modality`'s copy of every routed weight (shared
    weights as they are). It computes what the routed model computes on tokens that are all of that modality;
    a Hugging Face model stays one (save_pretrained, from_pretrained and generate work)."""
    _check_routed(routed, "extract")
    modalities = routed.plan.modalities
    if isinstance(modality, bool) or not isinstance(modality, int) or not 0 <= modality < modalities:
        raise SparsifyError(f"modality must be an int in [0, {modalities}) for this {modalities}-modality model, "
                            f"got {modality!r}")
    # dense_view gives every routed parameter modality k's copy (tied aliases stay one tensor), so the deep copy
    # is the dense model with those weights. The modules' link back to the routed model is not copied.
    with routed.dense_view(modality):
        dense = copy.deepcopy(routed._dense, memo={id(routed): None})
    for module in dense.modules():
        for key in [k for k in module.__dict__ if k.startswith("_sparsify")]:
            del module.__dict__[key]
        module.__dict__.pop("forward", None)  # back to the class's own forward
    return dense.train(routed.training)


def export(routed: RoutedModel, path, *args, **kwargs) -> Path:
    """Write a torch.export program (.pt2) of the routed model: the graph for the given example call
    (default: api.example_call), in the model's current mode, with modality_ids its last input.
    `torch.export.load(path)` reads it back after `import sparsify` (which registers the routed ops);
    `.module()(*inputs, modality_ids=ids)` runs it. Nothing is left behind if writing fails."""
    _check_routed(routed, "export")
    path = Path(path)  # checked before anything is captured
    if path.suffix != ".pt2":
        raise SparsifyError(f"export() writes a .pt2 file (torch.export.save); got {path.name!r}")
    if not path.parent.is_dir():
        raise SparsifyError(f"export(): the directory {str(path.parent)!r} does not exist; create it first")
    kwargs.pop("modality_ids", None)  # an input of the program, not part of the example call
    inputs = routed.bind_inputs(args, kwargs) if args or kwargs else example_call(routed)
    entry, _ = routed.graph_for(inputs)
    program = _portable(module_tree.routed_program(entry.routed, routed._tensor), routed.call_defaults)
    handle, staging = tempfile.mkstemp(suffix=".pt2.partial", dir=path.parent)  # same filesystem: atomic rename
    os.close(handle)
    try:
        torch.export.save(program, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def _plain(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """The spec with every mapping type outside torch's own containers (a Hugging Face ModelOutput, which
    transformers registers with pytree only once its module is imported) as a dict of the same keys."""
    children = [_plain(child) for child in spec.children()]
    kind, context = spec.type, spec.context
    if kind not in (tuple, list, dict) and isinstance(kind, type) and issubclass(kind, dict):
        kind, context = dict, list(context)
    return pytree.TreeSpec(kind, context, children)


def _portable(program: ExportedProgram, call_defaults: dict) -> ExportedProgram:
    """`program` taking the routed model's call (inputs fixed to a call default, as use_cache=False, leave the
    signature: the graph specialised them) and returning plain containers (see _plain)."""
    dropped = {spec.arg.name for spec in program.graph_signature.input_specs
               if isinstance(spec.arg, ConstantArgument) and spec.arg.name in call_defaults
               and call_defaults[spec.arg.name] == spec.arg.value}
    graph_module = copy.deepcopy(program.graph_module)
    for node in [n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name in dropped]:
        if node.users:
            raise SparsifyError(f"internal: the exported graph reads its constant input {node.name!r}")
        graph_module.graph.erase_node(node)
    graph_module.recompile()
    signature = ExportGraphSignature(
        input_specs=[spec for spec in program.graph_signature.input_specs
                     if not (isinstance(spec.arg, ConstantArgument) and spec.arg.name in dropped)],
        output_specs=list(program.graph_signature.output_specs))
    call_graph = copy.deepcopy(program.module_call_graph)
    root = call_graph[0].signature
    args, kwargs = pytree.tree_unflatten(list(range(root.in_spec.num_leaves)), root.in_spec)
    kwargs = {k: v for k, v in kwargs.items() if k not in dropped}
    # The model's inputs positionally, in its forward's order, as routed(input_ids, modality_ids=ids) is called
    # (keywords bind to them by name too); modality_ids a keyword.
    args = (*args, *[v for k, v in kwargs.items() if k != MODALITY_IDS])
    kwargs = {MODALITY_IDS: kwargs[MODALITY_IDS]}
    call_graph[0] = dataclasses.replace(call_graph[0], signature=dataclasses.replace(
        root, in_spec=pytree.tree_flatten((args, kwargs))[1], out_spec=_plain(root.out_spec),
        forward_arg_names=[name for name in root.forward_arg_names or [] if name not in dropped] or None))
    return ExportedProgram(root=graph_module, graph=graph_module.graph, graph_signature=signature,
                           state_dict=program.state_dict, range_constraints=program.range_constraints,
                           module_call_graph=call_graph, example_inputs=None, constants=program.constants,
                           verifiers=[program.verifier])
