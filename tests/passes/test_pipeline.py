"""The routing pipeline is one list (passes/pipeline.py), and each pass refuses to run out of order."""
import pytest
import torch

from sparsify.errors import PassOrderError
from sparsify.passes import run_passes
from sparsify.passes.hoist import HoistPass
from sparsify.passes.lower import LowerPass
from sparsify.passes.pipeline import ROUTING_PASSES, RoutingContext, routing_passes
from sparsify.passes.route import RoutePass
from tests.passes.test_graph_check import captured_and_plan
from tests.passes.test_norm_patterns import RsqrtRMSNorm, Stack


def context(config, **overrides):
    values = dict(param_fqns=config["param_fqns"], user_inputs=config["user_inputs"], token_dims=config["token_dims"],
                  uses=config["uses"], routed=frozenset(config["routed"]), modalities=3, backend="auto",
                  device=torch.device("cpu"), hoist=True, eager_only=False)
    return RoutingContext(**{**values, **overrides})


def test_the_pipeline_lists_route_hoist_lower_and_drops_hoist_where_it_does_not_pay():
    _, _, config = captured_and_plan(Stack(RsqrtRMSNorm), "mot")
    assert [stage.name for stage in ROUTING_PASSES] == ["route", "hoist", "lower"]
    assert [p.name for p in routing_passes(context(config))] == ["route", "hoist", "lower"]
    assert [p.name for p in routing_passes(context(config, hoist=False))] == ["route", "lower"]
    assert [p.name for p in routing_passes(context(config, eager_only=True))] == ["route", "lower"]


def test_passes_run_out_of_order_raise():
    captured, _, config = captured_and_plan(Stack(RsqrtRMSNorm), "mot")
    dense = captured.graph_module
    for early in (HoistPass(), LowerPass(backend="torch", device=torch.device("cpu"))):
        with pytest.raises(PassOrderError, match=f"pass '{early.name}' runs after 'route'"):
            run_passes(dense, [early])
    routed = run_passes(dense, [RoutePass(**config), LowerPass(backend="torch", device=torch.device("cpu"))])
    with pytest.raises(PassOrderError, match="pass 'hoist' runs before 'lower'"):
        run_passes(routed, [HoistPass()])
    with pytest.raises(PassOrderError, match="routed already"):
        run_passes(routed, [RoutePass(**config)])
