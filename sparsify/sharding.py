"""FSDP2 for a routed model: every stacked [M, *S] parameter sharded over every rank, not over M of them.

FSDP2 shards a parameter on dim 0 by default. A routed parameter's dim 0 is its modality dim, of size M,
so at a world larger than M only M ranks would hold any of it. `fully_shard` here is torch's, with a
`shard_placement_fn` that shards each stacked parameter on a feature dim instead (the largest one the
shard group's size divides: FSDP2 pads only dim 0, and refuses uneven shards on other dims); every other
parameter keeps FSDP2's default. Apply it as torch's: per block, then the root.

    for block in routed.model.layers:
        sparsify.fully_shard(block, mp_policy=policy)
    sparsify.fully_shard(routed, mp_policy=policy)
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from sparsify import modality_split
from sparsify.errors import SparsifyError


def stacked_parameters(routed: nn.Module) -> dict[int, str]:
    """{id(parameter): FQN} of the routed model's stacked parameters, tied aliases once. None in a model split
    into per-modality copies (freeze): those are dense-shaped, and FSDP2's default dim 0 shards them over every
    rank."""
    out: dict[int, str] = {}
    if modality_split.is_split(routed):
        return out
    for fqn in routed.routed_fqns().values():
        out.setdefault(id(routed.get_parameter(fqn)), fqn)
    return out


def feature_dim(shape, group_size: int) -> int | None:
    """The feature dim (not the modality dim 0) to shard a stacked [M, *S] parameter on over `group_size`
    ranks: the largest that `group_size` divides; None where none does."""
    dims = sorted(range(1, len(shape)), key=lambda d: -shape[d])
    return next((d for d in dims if shape[d] % group_size == 0), None)


def placement_fn(stacked: dict[int, str], group_size: int, modalities: int, user_fn=None):
    """A shard_placement_fn for FSDP2: the user's choice where it makes one, a feature dim for stacked
    parameters, FSDP2's default (dim 0) for the rest."""
    from torch.distributed.tensor import Shard

    def place(param: nn.Parameter):
        chosen = user_fn(param) if user_fn is not None else None
        if chosen is not None or id(param) not in stacked:
            return chosen
        # FSDP2 shards a tensor-parallel parameter's local part (tensor_parallel.py): its size must divide
        dim = feature_dim(param.to_local().shape if hasattr(param, "to_local") else param.shape, group_size)
        if dim is None:
            if group_size > modalities:
                warnings.warn(
                    f"sparsify: {stacked[id(param)]} {list(param.shape)} is sharded on its modality dim: no feature "
                    f"dim divides the shard group's {group_size} ranks (FSDP2 pads only dim 0), so only {modalities} "
                    "ranks hold it. A shard group whose size divides the model's feature sizes (a power of two) "
                    "shards it over every rank.", stacklevel=3)
            return None
        return Shard(dim)

    return place


def fully_shard(module: nn.Module, *, routed: nn.Module | None = None, **kwargs):
    """torch.distributed.fsdp.fully_shard(module, **kwargs), with the routed model's stacked parameters
    sharded over every rank (module docstring). `routed`: the routed model `module` belongs to, found from
    the module where not given."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    routed = routed if routed is not None else routed_model_of(module)
    mesh = kwargs.get("mesh")
    # FSDP2 shards over a 1-D mesh, or over the last dim of a 2-D one (HSDP: replicate x shard).
    group_size = mesh.size(mesh.ndim - 1) if mesh is not None else dist.get_world_size()
    kwargs["shard_placement_fn"] = placement_fn(stacked_parameters(routed), group_size, routed.plan.modalities,
                                                kwargs.get("shard_placement_fn"))
    return torch_fully_shard(module, **kwargs)


def routed_model_of(module: nn.Module) -> nn.Module:
    from sparsify.routed_model import RoutedModel

    if isinstance(module, RoutedModel):
        return module
    for sub in module.modules():
        root = sub.__dict__.get("_sparsify_root")
        if root is not None:
            return root
    raise SparsifyError(f"sparsify.fully_shard: {type(module).__name__} is not part of a routed model (no module "
                        "of it runs a routed subgraph); pass routed=<the RoutedModel>, or use torch's fully_shard "
                        "for a dense model")


def check_placements(routed: nn.Module) -> None:
    """Warn once per parameter where torch's own fully_shard put a stacked parameter's shards on its modality
    dim over more ranks than modalities (all but M ranks then hold none of it)."""
    warned = routed.__dict__.setdefault("_sparsify_placement_warned", set())
    for param_id, fqn in stacked_parameters(routed).items():
        if fqn in warned:
            continue
        param = routed.get_parameter(fqn)
        placements, mesh = getattr(param, "placements", None), getattr(param, "device_mesh", None)
        if not placements or mesh is None:
            continue
        for mesh_dim, placement in enumerate(placements):
            if getattr(placement, "dim", None) == 0 and mesh.size(mesh_dim) > routed.plan.modalities:
                warned.add(fqn)
                warnings.warn(
                    f"sparsify: {fqn} {list(param.shape)} is sharded on its modality dim (size "
                    f"{routed.plan.modalities}) over {mesh.size(mesh_dim)} ranks, so {mesh.size(mesh_dim) - routed.plan.modalities} "
                    "ranks hold none of it: shard with sparsify.fully_shard(module, **same_arguments), which "
                    "shards stacked parameters on a feature dim", stacklevel=4)
