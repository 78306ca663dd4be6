"""One tensor per modality for each routed parameter: what freezing a modality and per-modality learning rates need.

A routed parameter is one [M, *S] tensor: the grouped GEMM reads it as one operand, FSDP2 shards it on a feature
dim (sharding.py) and the checkpoint stores it under the dense FQN. But requires_grad, an optimizer's state and a
param group's learning rate belong to whole tensors. So a routed model *splits* when a modality is frozen or
learning rates are given per modality: each routed parameter becomes M parameters, one per modality, and the
forward stacks them again where it reads the parameter. torch.nn.utils.parametrize does exactly this (a module
attribute computed from several registered tensors), so it is used rather than a hand-written property:

    owner.<name>                                  the [M, *S] stack the routed graphs read (unchanged)
    owner.parametrizations.<name>.original<m>     modality m's copy [*S]: a Parameter of its own

What that gives:
- A frozen modality's copies have requires_grad=False. No gradient reaches them, so any optimizer (AdamW's
  weight decay included) leaves them bitwise unchanged and allocates no state for them; a model's
  `parameters()` hands an optimizer only what trains.
- The stack's backward records which modalities are frozen; the routed linear reads that from its weight's
  autograd node and skips those modalities' weight-gradient GEMMs (ops/routed_linear.py).
- FSDP2 shards each copy over every rank on its dim 0, as any dense weight (no modality dim to shard).
- `state_dict()` and `load_state_dict()` keep speaking the stacked format (hooks below): sparsify.save writes
  the same checkpoint as before, and loads ones written before.
What it costs: the forward stacks the copies (a copy of the routed weights, per forward; under FSDP2 the
unsharded copies are gathered into one buffer and stacked from it), where an unsplit model reads its stacked
parameter in place. A model that never freezes or splits its learning rates never pays it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparsify.errors import SparsifyError


class _StackCopies(torch.autograd.Function):
    """torch.stack(copies), whose backward gives no gradient to the frozen copies. Its autograd node (the
    stack's grad_fn) carries `frozen_modalities`, which the routed linear reads to skip their GEMMs."""

    @staticmethod
    def forward(ctx, *copies):
        ctx.frozen_modalities = tuple(m for m, needs in enumerate(ctx.needs_input_grad) if not needs)
        return torch.stack(copies)

    @staticmethod
    def backward(ctx, grad):
        return tuple(None if m in ctx.frozen_modalities else grad[m] for m in range(grad.shape[0]))


class ModalityCopies(nn.Module):
    """The parametrization: M per-modality tensors <-> their [M, *S] stack."""

    def forward(self, *copies: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(c.requires_grad for c in copies):
            return _StackCopies.apply(*copies)
        return torch.stack(copies)

    def right_inverse(self, stacked: torch.Tensor):
        # Views of the stacked tensor: splitting copies nothing (each becomes a Parameter of its own).
        return tuple(stacked.unbind(0))


def _copies(parametrizations: nn.Module) -> list[nn.Parameter]:
    """The per-modality Parameters of one split routed parameter (its ParametrizationList's original0, ...)."""
    return [getattr(parametrizations, f"original{m}") for m in range(parametrizations.ntensors)]


def frozen_modalities_of(weight: torch.Tensor) -> tuple[int, ...]:
    """The modalities whose copies of `weight` (a routed op's stacked operand) take no gradient, as the stack
    that made it recorded; () for a stacked parameter read in place, or a tensor a tracer made."""
    return getattr(weight.grad_fn, "frozen_modalities", ())


def is_split(routed) -> bool:
    return bool(routed.__dict__.get("_split"))


def _all_copies(routed) -> dict[str, list[nn.Parameter]]:
    """{plan FQN: its per-modality Parameters} of a split model, read from the module tree as it is now (FSDP2
    replaces each Parameter with a sharded one: a list kept from splitting would hold the old ones)."""
    return {fqn: _copies(owner.parametrizations[name]) for fqn, owner, name, _ in _owners(routed)}


def _owners(routed):
    """(plan FQN, owner module, attribute name, FQN now) of each routed tensor once (tied aliases: refused)."""
    fqns = routed.routed_fqns()
    for p in routed.plan.params:
        if p.aliases:
            raise SparsifyError(
                f"routed parameter {p.fqn!r} is tied to {', '.join(p.aliases)}: per-modality tensors (frozen "
                "modalities, per-modality learning rates) are not supported for tied routed parameters; route it "
                "untied (exclude=...) or keep it shared")
        owner, _, name = fqns[p.fqn].rpartition(".")
        yield p.fqn, routed.get_submodule(owner), name, fqns[p.fqn]


def split(routed) -> None:
    """Give every routed parameter one tensor per modality (see the module). Idempotent. An optimizer made
    before holds the stacked tensors, which the model no longer has: make it after."""
    if is_split(routed):
        return
    if routed._stacked_sharded():
        raise SparsifyError("freeze / per-modality learning rates on a model already sharded with fully_shard: "
                            "call routed.freeze(...) (or convert(..., frozen=[...])) before fully_shard")
    for _, owner, name, _ in _owners(routed):
        requires_grad = owner._parameters[name].requires_grad
        parametrize.register_parametrization(owner, name, ModalityCopies(), unsafe=True)
        for copy in _copies(owner.parametrizations[name]):
            copy.requires_grad_(requires_grad)
    routed.__dict__["_split"] = True


def merge(routed) -> None:
    """Back to one stacked parameter per routed tensor (its requires_grad: whether any copy trains)."""
    if not is_split(routed):
        return
    for _, owner, name, _ in _owners(routed):
        requires_grad = any(c.requires_grad for c in _copies(owner.parametrizations[name]))
        parametrize.remove_parametrizations(owner, name, leave_parametrized=True)
        owner._parameters[name].requires_grad_(requires_grad)
    routed.__dict__["_split"] = False


def copies_of(routed, modality: int) -> list[nn.Parameter]:
    """Modality `modality`'s copy of every routed parameter (the model split)."""
    return [originals[modality] for originals in _all_copies(routed).values()]


def frozen_modalities(routed) -> list[int]:
    """The modalities none of whose copies takes a gradient: read from requires_grad, the one place it is kept
    (so a requires_grad_ of the user's own counts too)."""
    if not is_split(routed):
        return []
    copies = list(_all_copies(routed).values())
    return [m for m in range(routed.plan.modalities) if copies and not any(c[m].requires_grad for c in copies)]


def set_frozen(routed, modalities, frozen: bool) -> None:
    modalities = check_modalities(routed.plan.modalities, modalities)
    if routed._stacked_sharded():  # FSDP2 fixed which parameters reduce gradients when it sharded them
        raise SparsifyError("freeze / unfreeze on a model already sharded with fully_shard: freeze before "
                            "fully_shard (convert(..., frozen=[...]) or routed.freeze(...)), then shard")
    split(routed)
    for m in modalities:
        for copy in copies_of(routed, m):
            copy.requires_grad_(not frozen)


def check_modalities(count: int, modalities) -> list[int]:
    """`modalities` (an int or a sequence of ints) as a list, each checked to be in [0, count)."""
    if isinstance(modalities, int) and not isinstance(modalities, bool):
        modalities = [modalities]
    if not isinstance(modalities, (list, tuple, range, set, frozenset)):
        raise SparsifyError(f"modalities are given as an int or a list of ints, got {type(modalities).__name__}")
    out = []
    for m in modalities:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < count:
            raise SparsifyError(f"modalities are ints in [0, {count}) for this {count}-modality model, got {m!r}")
        out.append(m)
    return out


def param_groups(routed, lr: dict | None = None, **group_options) -> list[dict]:
    """Parameter groups for a torch optimizer: one per trainable modality (its copies of the routed parameters,
    learning rate `lr[m]` where given) and one for the shared parameters (lr["shared"] where given). Frozen
    copies are in no group. `group_options` (weight_decay=...) go into every group."""
    lr = dict(lr or {})
    unknown = [k for k in lr if k != "shared" and k not in range(routed.plan.modalities)]
    if unknown:
        raise SparsifyError(f"lr keys are modalities in [0, {routed.plan.modalities}) or 'shared'; got {unknown}")
    split(routed)
    routed_ids = {id(c) for originals in _all_copies(routed).values() for c in originals}
    groups = []
    shared = [p for p in routed.parameters() if id(p) not in routed_ids and p.requires_grad]
    if shared:
        groups.append({"params": shared, "modality": "shared", **group_options,
                       **({"lr": lr["shared"]} if "shared" in lr else {})})
    for m in range(routed.plan.modalities):
        trainable = [c for c in copies_of(routed, m) if c.requires_grad]
        if trainable:
            groups.append({"params": trainable, "modality": m, **group_options, **({"lr": lr[m]} if m in lr else {})})
    return groups


# -- the stacked format in state dicts -----------------------------------------------------------------------
def _original_keys(routed, prefix: str) -> dict[str, tuple[str, int]]:
    """{state-dict key of a copy: (key of its stacked tensor, modality)} for a split model."""
    out = {}
    for _, owner, name, path in _owners(routed):
        owner_path = path.rpartition(".")[0]
        base = f"{prefix}{owner_path + '.' if owner_path else ''}parametrizations.{name}.original"
        for m in range(owner.parametrizations[name].ntensors):
            out[f"{base}{m}"] = (f"{prefix}{path}", m)
    return out


def stacked_state_dict_hook(routed, state_dict, prefix, local_metadata):
    """state_dict(): each routed tensor stacked under its FQN, as an unsplit model's."""
    if not is_split(routed):
        return state_dict
    copies = _original_keys(routed, prefix)
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for key, (stacked_key, m) in copies.items():
        if key in state_dict:
            stacks.setdefault(stacked_key, {})[m] = state_dict[key].detach()
    entries = list(state_dict.items())
    state_dict.clear()
    for key, value in entries:  # in the order of the keys: the stack where its first copy was
        if key not in copies:
            state_dict[key] = value
        elif copies[key][0] not in state_dict:
            parts = stacks[copies[key][0]]
            state_dict[copies[key][0]] = torch.stack([parts[m] for m in sorted(parts)])
    return state_dict


def split_load_pre_hook(routed, state_dict, prefix, *args):
    """load_state_dict(): a stacked routed tensor fills each modality's copy."""
    if not is_split(routed):
        return
    copies = _original_keys(routed, prefix)
    for key, (stacked_key, m) in copies.items():
        if stacked_key in state_dict and key not in state_dict:
            state_dict[key] = state_dict[stacked_key][m]
    for stacked_key, _ in copies.values():
        state_dict.pop(stacked_key, None)


def parameter_at(root: nn.Module, target: str) -> torch.Tensor:
    """root.get_parameter(target), or for a split routed parameter its [M, *S] stack (what the graphs read)."""
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if parametrize.is_parametrized(owner, name):
        return getattr(owner, name)
    return nn.Module.get_parameter(root, target)


@contextmanager
def dense_view(routed, modality: int):
    """While inside: each owner of a split routed parameter is its class before parametrizing, holding modality
    `modality`'s copy (the Parameter itself) under the parameter's name, its `parametrizations` hidden: the dense
    module export captures, under the dense FQNs (RoutedModel.dense_view)."""
    swapped = []
    try:
        for _, owner, name, _ in _owners(routed):
            if owner in (s[0] for s in swapped):
                continue  # a second routed parameter of the same owner is swapped with the first
            parametrized_class, parametrizations = type(owner), owner._modules["parametrizations"]
            swapped.append((owner, parametrized_class, parametrizations))
            owner.__class__ = parametrize.type_before_parametrizations(owner)
            del owner._modules["parametrizations"]
            for attr, originals in parametrizations.items():
                owner._parameters[attr] = _copies(originals)[modality]
        yield
    finally:
        for owner, parametrized_class, parametrizations in reversed(swapped):
            for attr in parametrizations:
                owner._parameters.pop(attr, None)
            owner._modules["parametrizations"] = parametrizations
            owner.__class__ = parametrized_class
