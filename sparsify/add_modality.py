"""add_modality: a routed model with one more modality, its new copies made from an existing modality's.

    sparsify.add_modality(routed, copy_from=0)          M -> M + 1, modality M starts as modality 0
    sparsify.add_modality(routed, init="independent")   modality M re-initialised as the dense model initialises

Ids below M compute exactly what they computed before (their copies are untouched); graphs are captured again
for M + 1 modalities at the next call; the plan (and so a saved checkpoint) says M + 1. Frozen modalities stay
frozen and the new one trains.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sparsify import modality_split
from sparsify.errors import SparsifyError, reported
from sparsify.routed_model import RoutedModel


@reported("sparsify.add_modality")
def add_modality(routed: RoutedModel, copy_from: int | None = 0, init: str = "copy") -> RoutedModel:
    """Add a modality to `routed`, in place (a 7B model is not copied), and return it. The parameters change:
    build the optimizer after, and call it before fully_shard."""
    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"add_modality() takes a RoutedModel (from sparsify.convert or sparsify.load), "
                            f"got {type(routed).__name__}")
    modalities = routed.plan.modalities
    if init not in ("copy", "independent"):
        raise SparsifyError(f"init is 'copy' (the new modality starts as modality copy_from) or 'independent' "
                            f"(re-initialised), got {init!r}")
    if init == "copy":
        if isinstance(copy_from, bool) or not isinstance(copy_from, int):
            raise SparsifyError(f"copy_from is one modality (an int in [0, {modalities})), got {copy_from!r}")
        modality_split.check_modalities(modalities, copy_from)
    if routed._stacked_sharded():
        raise SparsifyError("add_modality on a model sharded with fully_shard: add the modality first (or to the "
                            "consolidated checkpoint: `sparsify add-modality ROUTED -o OUT`), then shard")
    was_split, frozen = modality_split.is_split(routed), list(routed.frozen_modalities)
    modality_split.merge(routed)
    new_copies = _copies_from(routed, copy_from) if init == "copy" else _independent_copies(routed)
    fqns = routed.routed_fqns()
    with torch.no_grad():
        for p in routed.plan.params:
            stacked = routed.get_parameter(fqns[p.fqn])
            grown = nn.Parameter(torch.cat([stacked.detach(), new_copies[p.fqn].unsqueeze(0).to(stacked)]),
                                 requires_grad=stacked.requires_grad)
            for name in [p.fqn, *p.aliases]:
                owner, _, attr = fqns[name].rpartition(".")
                routed.get_submodule(owner)._parameters[attr] = grown
    routed.plan.modalities = modalities + 1
    routed.forget_graphs()  # graphs were routed for M modalities; the next call captures for M + 1
    routed.__dict__.pop("verify_report", None)
    if was_split:
        modality_split.split(routed)
        if frozen:
            routed.freeze(frozen)
    return routed


def _copies_from(routed: RoutedModel, modality: int) -> dict[str, torch.Tensor]:
    fqns = routed.routed_fqns()
    return {p.fqn: routed.get_parameter(fqns[p.fqn])[modality].detach().clone() for p in routed.plan.params}


def _independent_copies(routed: RoutedModel) -> dict[str, torch.Tensor]:
    """Each routed parameter re-initialised by its module's initialiser (api.reinit_module), run on dense-shaped
    stand-ins so that neither the existing copies nor the module's shared parameters change."""
    from sparsify.api import reinit_module

    fqns = routed.routed_fqns()
    by_owner: dict[str, list[str]] = {}
    for p in routed.plan.params:
        owner, _, attr = fqns[p.fqn].rpartition(".")
        by_owner.setdefault(owner, []).append((p.fqn, attr))
    out = {}
    with torch.no_grad():
        for owner_fqn, names in by_owner.items():
            owner = routed.get_submodule(owner_fqn)
            saved = dict(owner._parameters)
            try:
                routed_attrs = {attr for _, attr in names}
                for attr, tensor in saved.items():  # shared ones too: re-initialising resets them
                    if tensor is not None:
                        start = tensor[0] if attr in routed_attrs else tensor  # what an initialiser leaves alone
                        owner._parameters[attr] = nn.Parameter(start.detach().clone(), requires_grad=False)
                reinit_module(routed, owner_fqn)
                for fqn, attr in names:
                    out[fqn] = owner._parameters[attr].detach().clone()
            finally:
                owner._parameters.clear()
                owner._parameters.update(saved)
    return out
