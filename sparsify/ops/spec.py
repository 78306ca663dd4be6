"""One declaration per routed op: everything the passes and the run-time need to know about it.

Each op file ends with `register(RoutedOpSpec(...))`: its custom op, its direct form (the reference without
the dispatcher, for decoding steps), the module holding its autograd, whether `lower` picks its backend,
whether it is token-wise (hoist may run it on rows in modality order), and the dense uses it replaces: for
each, how to recognise it (`classify`) and how route rewrites it (`rewrite`). Every table the passes read
is derived from the registry here (Thunder's `register_operator`, PT2E's pattern + replacement pairs):
adding a routed op is one new file and one registration.

    param_uses.classify   the first spec whose `classify` claims a use, in registration order
    route                 the claimed use's `rewrite`
    lower                 specs with `lowered`
    hoist                 specs with `token_wise`
    eager / direct forms  every spec's `direct` and `autograd`
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class UseKind:
    """One kind of parameter use a routed op replaces: where its tokens are and how route rewrites it."""

    name: str
    role: str                  # linear | norm | conv | elementwise | embedding | unsupported
    token_operand: int | None  # node.args index of the tensor whose token dims route it; None: the op's output
    token_layout: str          # rows: tokens in every dim but the last | channels_first: [B, C, T] |
    #                            columns: w @ x, tokens in every dim but x's -2 | broadcast: elementwise |
    #                            indices: an embedding lookup, tokens in the index tensor's dims
    lift: str                  # how the parameter takes the routed form (shown in the plan's uses)
    # route's rewrite: (rewriter, node, uses, args, stacked) -> the node replacing `node`, or None (done in
    # place); None for kinds that cannot be routed
    rewrite: Callable | None
    gathered: bool = False     # routed by per-token copies that broadcast against the tokens, not a stacked op


@dataclass(frozen=True)
class RoutedOpSpec:
    op: object                          # torch.ops.sparsify.<name>.default
    uses: tuple[UseKind, ...]           # the dense uses this op replaces
    # (node, operand, parameter value) -> (kind name, problem) if this op claims the use, else None
    classify: Callable | None = None
    direct: Callable | None = None      # the reference with the op's signature, no autograd (decoding steps)
    autograd: types.ModuleType | None = None  # holds _setup_context(ctx, inputs, output), _backward(ctx, *g, direct)
    lowered: bool = False               # takes backend= ("torch" | "triton"), chosen by the lower pass
    token_wise: bool = False            # x at position 0, ids at 1, each output row from its own input row
    shared_by_default: bool = False     # no preset selects its uses (include= does): embeddings

    @property
    def name(self) -> str:
        return self.op._schema.name.split("::")[-1]


SPECS: list[RoutedOpSpec] = []
_BY_OP: dict = {}  # spec_of runs per eager op call
# Kinds no op replaces: the use stays as it is and its parameter shared.
UNSUPPORTED = UseKind("unsupported", "unsupported", None, "broadcast", "", None)
_KINDS: dict[str, UseKind] = {UNSUPPORTED.name: UNSUPPORTED}


def register(spec: RoutedOpSpec) -> RoutedOpSpec:
    if spec.op in _BY_OP:
        raise ValueError(f"{spec.name} is registered twice")
    if any(kind.name in _KINDS for kind in spec.uses):
        raise ValueError(f"{spec.name} declares a use kind another op declares: {[k.name for k in spec.uses]}")
    SPECS.append(spec)
    _BY_OP[spec.op] = spec
    _KINDS.update((kind.name, kind) for kind in spec.uses)
    return spec


def use_kinds() -> dict[str, UseKind]:
    """Every use kind by name: those the registered ops replace, and `unsupported`."""
    return _KINDS


def spec_of(op) -> RoutedOpSpec | None:
    return _BY_OP.get(op) if isinstance(op, torch._ops.OpOverload) else None


def lowered_ops() -> set:
    return {spec.op for spec in SPECS if spec.lowered}


def token_wise_ops() -> set:
    return {spec.op for spec in SPECS if spec.token_wise}


def shared_by_default_kinds() -> set[str]:
    return {kind.name for spec in SPECS if spec.shared_by_default for kind in spec.uses}
