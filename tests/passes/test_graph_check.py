"""Passes check themselves: a bad rewrite is reported by the pass, naming the node and the source line."""
import pytest
import torch
from torch.testing import FileCheck

import sparsify
from sparsify.capture import capture
from sparsify.errors import PassCheckError
from sparsify.passes import route as route_module
from sparsify.passes.graph_check import check_graph, snapshot_values
from sparsify.passes.route import RoutePass
from sparsify.plan import build_plan
from tests.passes.test_norm_patterns import RsqrtRMSNorm, Stack, ViewedParameters


def captured_and_plan(model, policy):
    captured = capture(model, {"tokens": torch.randint(0, 30, (2, 7))})
    plan = build_plan(captured, model, 3, policy=policy)
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    param_fqns = {n.name: t for n, (k, t) in zip(placeholders, captured.placeholders) if k == "parameter"}
    config = dict(param_fqns=param_fqns, routed=set(plan.routed), modalities=3, token_dims=captured.token_dims,
                  user_inputs=[n.name for n in captured.user_input_nodes()], uses=captured.param_uses)
    return captured, plan, config


def test_route_before_and_after_on_a_llama_style_block():
    torch.manual_seed(0)
    captured, plan, config = captured_and_plan(Stack(RsqrtRMSNorm), "mot")
    before = captured.graph_module.code
    FileCheck().check("aten.embedding").check("aten.rsqrt").check("aten.linear").check("aten.relu") \
        .check("aten.linear").check("aten.add").check("aten.rsqrt").run(before)
    result = RoutePass(**config)(captured.graph_module)
    assert result.modified
    FileCheck().check("aten.embedding").check("sparsify.routed_rms_norm").check("sparsify.routed_linear") \
        .check("aten.relu").check("sparsify.routed_linear").check("aten.add").check("sparsify.routed_rms_norm") \
        .check_not("aten.rsqrt").check_not("aten.linear").run(result.graph_module.code)
    # ensures left a fake value on every node, the routed parameters' and ids' included
    for node in result.graph_module.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            assert "val" in node.meta, node.name
    ids = next(n for n in result.graph_module.graph.nodes if n.name == "modality_ids")
    assert ids.meta["val"].dtype == torch.long and ids.meta["val"].dim() == 2


def test_route_reuses_the_plans_analysis(monkeypatch):
    def analyse_again(*args, **kwargs):
        raise AssertionError("route analysed the graph again")

    monkeypatch.setattr(route_module, "find_param_uses", analyse_again)
    torch.manual_seed(0)
    routed = sparsify.convert(Stack(RsqrtRMSNorm).eval(), 3, policy="mot")
    assert routed.verify_report.max_rel_err <= 1e-5


def test_a_bad_view_lift_is_reported_at_the_route_pass(monkeypatch):
    """The bug this check was written for: view(-1) lifted as view([-1, -1])."""
    real_lift = route_module._lift_view

    def old_lift(node, modalities):
        if node.target == torch.ops.aten.view.default:
            node.args = (node.args[0], [-1] + list(node.args[1]))
        else:
            real_lift(node, modalities)

    monkeypatch.setattr(route_module, "_lift_view", old_lift)
    captured, plan, config = captured_and_plan(ViewedParameters(), "all")
    with pytest.raises(PassCheckError) as error:
        RoutePass(**config)(captured.graph_module)
    message = str(error.value)
    assert "pass 'route' left an invalid graph" in message and "aten.view.default" in message
    assert "test_norm_patterns.py" in message and "flat_scale.view(-1)" in message  # the model's source line


def test_check_graph_names_a_node_whose_shape_a_pass_changed():
    captured, _, _ = captured_and_plan(Stack(RsqrtRMSNorm), "mot")
    graph_module = captured.graph_module
    before = snapshot_values(graph_module)
    check_graph(graph_module, "nothing", before)  # an untouched graph passes
    relu = next(n for n in graph_module.graph.nodes if n.target == torch.ops.aten.relu.default)
    with graph_module.graph.inserting_before(relu):
        wider = graph_module.graph.call_function(torch.ops.aten.cat.default, ([relu.args[0], relu.args[0]], -1))
    relu.replace_input_with(relu.args[0], wider)
    with pytest.raises(PassCheckError, match=r"pass 'broken' changed the value of node 'relu'.*before the pass"):
        check_graph(graph_module, "broken", before)
