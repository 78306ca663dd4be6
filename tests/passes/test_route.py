"""Route pass on toy graphs: op list before/after, lint, numbers, and per-token routing."""
from collections import Counter

import pytest
import torch

import sparsify
from sparsify.capture import capture
from sparsify.passes.route import route
from sparsify.plan import build_plan
from tests.toy_models import (LoopOverTime, SeqFirst, SeqFirstFlattened, StepwiseRecurrent, ToyLM,
                               TransposedWeights, WeightInSoftmax)

aten, sp = torch.ops.aten, torch.ops.sparsify


def op_counts(graph_module):
    return Counter(n.target for n in graph_module.graph.nodes if n.op == "call_function")


def toy():
    torch.manual_seed(0)
    return ToyLM().eval(), torch.randint(0, 50, (2, 7))


def test_route_rewrites_every_form_in_the_toy_graph():
    model, tokens = toy()
    captured = capture(model, {"tokens": tokens})
    plan = build_plan(captured, model, 3, policy="all")
    before = op_counts(captured.graph_module)
    assert before[aten.linear.default] == 3 and before[aten.addmm.default] == 2
    assert before[aten.matmul.default] == 2 and before[aten.layer_norm.default] == 2
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    param_fqns = {n.name: t for n, (k, t) in zip(placeholders, captured.placeholders) if k == "parameter"}
    result = route(captured.graph_module, param_fqns=param_fqns, routed=set(plan.routed), modalities=3,
                   token_dims=captured.token_dims, user_inputs=[n.name for n in captured.user_input_nodes()])
    after = op_counts(result.graph_module)
    assert result.modified
    # per block: up (linear), conv1d (addmm), left (w @ x); plus the LM head (linear)
    assert after[sp.routed_linear.default] == 7
    assert after[sp.routed_layer_norm.default] == 2
    assert after[sp.routed_rms_norm.default] == 2  # the decomposed RMSNorm, fused
    assert after[sp.routed_gather.default] == 2  # the shift, per block
    assert after[aten.rsqrt.default] == 0  # the RMSNorm's own ops are gone
    for dense_op in (aten.linear.default, aten.addmm.default, aten.matmul.default, aten.layer_norm.default):
        assert after[dense_op] == 0
    result.graph_module.graph.lint()
    assert [n.name for n in result.graph_module.graph.nodes if n.op == "placeholder"][-1] == "modality_ids"


def test_route_without_routed_parameters_is_a_no_op():
    model, tokens = toy()
    captured = capture(model, {"tokens": tokens})
    code = captured.graph_module.code
    result = route(captured.graph_module, param_fqns={}, routed=set(), modalities=3, token_dims=captured.token_dims,
                   user_inputs=[n.name for n in captured.user_input_nodes()])
    assert not result.modified and result.graph_module.code == code


def test_each_token_uses_its_own_modality_copy_in_every_form():
    """ToyLM mixes no information across tokens, so output t depends on modality_ids[t] alone."""
    model, tokens = toy()
    routed = sparsify.convert(model, 3, example_inputs=(tokens,), policy="all")
    assert routed.verify_report.ok and routed.verify_report.max_rel_err <= 1e-5
    ids = torch.tensor([[0, 1, 2, 1, 0, 0, 2], [1, 1, 0, 2, 2, 0, 1]])
    with torch.no_grad():
        before = routed(tokens, modality_ids=ids)
        torch.testing.assert_close(before, model(tokens), rtol=1e-5, atol=1e-6)
        for fqn in routed.plan.routed:
            routed.get_parameter(fqn)[1].mul_(1.5).add_(0.1)
        after = routed(tokens, modality_ids=ids)
    changed = (after - before).abs().amax(-1) > 1e-4
    assert torch.equal(changed, ids == 1)


def test_token_dims_in_seq_batch_order():
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x = torch.randn(7, 2, 6)  # [seq, batch, d]: ids are shaped like the leading dims, (7, 2)
    routed = sparsify.convert(model, 2, example_inputs=(x,), policy="all")
    ids = torch.randint(0, 2, (7, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routed.get_parameter("layers.0.weight")[1].add_(1.0)
        out = routed(x, modality_ids=ids)
        dense_out = model(x)
    changed = (out - dense_out).abs().amax(-1) > 1e-4
    assert torch.equal(changed, ids == 1)


def test_tokens_flattened_seq_major_use_transposed_ids():
    torch.manual_seed(0)
    model = SeqFirstFlattened().eval()
    x = torch.randn(2, 7, 6)  # made seq-first, then flattened to [seq * batch, d] before the projection
    routed = sparsify.convert(model, 2, example_inputs=(x,), policy="all")
    assert "seq-major" in routed.plan.params[0].uses[0]
    ids = torch.randint(0, 2, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routed.get_parameter("layers.0.weight")[1].add_(1.0)
        changed = (routed(x, modality_ids=ids) - model(x)).abs().amax(-1) > 1e-4
    assert torch.equal(changed, ids == 1)


def test_shape_specialised_model_recaptures_per_sequence_length():
    torch.manual_seed(0)
    model = LoopOverTime().eval()
    routed = sparsify.convert(model, 2, example_inputs=(torch.randn(2, 5, 6),), policy="all")
    param = routed.get_parameter("layers.0.weight")
    for seq in (5, 9, 3):
        x = torch.randn(3, seq, 6)
        ids = torch.randint(0, 2, (3, seq))
        torch.testing.assert_close(routed(x, modality_ids=ids), model(x), rtol=1e-5, atol=1e-6)
    graphs = [e for entries in routed._graphs.values() for e in entries]
    assert len(graphs) == 3  # one capture per sequence length, all bound to the same parameter
    assert routed.get_parameter("layers.0.weight") is param


def test_unroutable_use_names_node_module_and_source_line():
    model = WeightInSoftmax()
    with pytest.raises(sparsify.RoutingError) as info:
        sparsify.convert(model, 2, example_inputs=(torch.randn(2, 5, 6),), policy="mot")
    message = str(info.value)
    assert "layers.0.weight" in message and "softmax" in message
    assert "toy_models.py" in message and "torch.softmax(self.layers[0].weight" in message
    assert "exclude=" in message  # says how to fix


def test_projections_applied_one_time_step_at_a_time_are_routed_per_step():
    torch.manual_seed(0)
    model = StepwiseRecurrent().eval()
    x = torch.randn(2, 7, 6)  # the loop fixes the length: keep it unlike every feature size
    routed = sparsify.convert(model, 2, example_inputs=(x,), policy="all")
    # the input projection and norm see x[:, t]; the recurrent projection sees the state, which
    # has no sequence position of its own, so it cannot be routed per token and stays shared
    assert set(routed.plan.routed) == {"layers.0.inp.weight", "layers.0.inp.bias", "layers.0.norm.weight",
                                       "layers.0.norm.bias"}
    assert "sequence" in {p.fqn: p.reason for p in routed.plan.shared}["layers.0.rec.weight"]
    ids = torch.tensor([[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]])
    with torch.no_grad():
        before = routed(x, modality_ids=ids)
        torch.testing.assert_close(before, model(x), rtol=1e-5, atol=1e-6)
        weight = routed.get_parameter("layers.0.inp.weight")[1]
        weight.add_(torch.randn_like(weight))  # not a constant: the LayerNorm output sums to zero
        after = routed(x, modality_ids=ids)
    changed = (after - before).abs().amax(-1) > 1e-6
    # the recurrence carries the change forward from the first modality-1 step
    assert torch.equal(changed, torch.tensor([[False, False, True, True, True, True, True],
                                              [False, False, False, False, True, True, True]]))


def test_weights_transposed_with_dot_T_and_mT_are_routed():
    torch.manual_seed(0)
    model, x = TransposedWeights().eval(), torch.randn(2, 7, 6)
    routed = sparsify.convert(model, 2, example_inputs=(x,), policy="all")
    assert set(routed.plan.routed) == {"a", "b"}
    ids = torch.randint(0, 2, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(routed(x, modality_ids=ids), model(x), rtol=1e-5, atol=1e-6)
        routed.get_parameter("a")[1].mul_(2.0)
        changed = (routed(x, modality_ids=ids) - model(x)).abs().amax(-1) > 1e-5
    assert torch.equal(changed, ids == 1)
