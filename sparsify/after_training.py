"""After training: one modality's weights back in the dense class, and the routed model as a .pt2 program.

    extract(routed, modality=k)  =>  the dense model's class, every routed weight replaced by copy k
    export(routed, path)         =>  torch.export .pt2 of the routed graph, modality_ids its last input
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from sparsify import module_tree
from sparsify.api import example_call
from sparsify.errors import SparsifyError
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
    program = module_tree.routed_program(entry.routed, routed._tensor)
    handle, staging = tempfile.mkstemp(suffix=".pt2.partial", dir=path.parent)  # same filesystem: atomic rename
    os.close(handle)
    try:
        torch.export.save(program, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path
