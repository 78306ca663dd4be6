"""The routing pipeline as data, in one place (as ExecuTorch's exir lists its passes).

    capture (canonicalize)  ->  plan (norm_patterns, token_provenance, param_uses)      sparsify.api.convert
    route  ->  hoist (where it pays)  ->  lower                                          ROUTING_PASSES
    ->  module tree (training graphs) | direct_calls (decoding steps)                   RoutedModel.route_captured

Each pass's `requires` raises a PassOrderError when it runs out of order (hoist before route, route on a
routed graph, lower before route, hoist after lower), so a caller that builds its own list cannot silently
get a wrong graph. The analyses a pass needs travel explicitly in `RoutingContext`, not on shared objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparsify.ops.backend import use_triton
from sparsify.passes.hoist import HoistPass
from sparsify.passes.lower import LowerPass
from sparsify.passes.route import RoutePass


@dataclass(frozen=True)
class RoutingContext:
    """What the routing passes of one captured graph need to know."""

    param_fqns: dict[str, str]   # parameter placeholder name -> FQN
    user_inputs: list[str]       # placeholder names of the model's own inputs
    token_dims: tuple            # the capture's (batch, seq) sizes
    uses: dict | None            # the plan's param_uses analysis of this graph (route reuses it)
    routed: frozenset            # FQNs the plan routes
    modalities: int
    backend: str                 # "auto" | "torch" | "triton"
    device: torch.device
    hoist: bool                  # the routed model's switch
    eager_only: bool             # a decoding step: run as it is, a handful of rows
    autocast: bool = False       # captured under torch.autocast: routed ops cast operands as the ops they replace


@dataclass(frozen=True)
class Stage:
    name: str
    make: Callable[[RoutingContext], object]           # the pass object for this graph
    when: Callable[[RoutingContext], bool] = lambda context: True


def _route(c: RoutingContext) -> RoutePass:
    return RoutePass(param_fqns=c.param_fqns, routed=set(c.routed), modalities=c.modalities,
                     token_dims=c.token_dims, user_inputs=c.user_inputs, uses=c.uses, autocast=c.autocast)


def _hoist_pays(c: RoutingContext) -> bool:
    # Where the routed ops group rows by sorting (the torch references): not in a decoding step (a handful of
    # rows, where the boundary copies cost more than they save), nor for the Triton kernels, which pick each
    # row's weights themselves.
    return c.hoist and not c.eager_only and not use_triton(c.backend, c.device)


ROUTING_PASSES = (
    Stage("route", _route),
    Stage("hoist", lambda c: HoistPass(), when=_hoist_pays),
    Stage("lower", lambda c: LowerPass(backend=c.backend, device=c.device)),
)


def routing_passes(context: RoutingContext) -> list:
    """The pass objects to run, in order, on a captured graph described by `context`."""
    return [stage.make(context) for stage in ROUTING_PASSES if stage.when(context)]
