"""The hoist pass: tokens sorted by modality once per token-wise region of a block, not in every routed op.

Hoisted and unhoisted graphs of the same routed model agree exactly up to float rounding (fp32, rel <= 1e-6,
outputs and every gradient); the permutations in a hoisted Llama graph are counted per block.
"""
import collections

import pytest
import torch

import sparsify
from tests.conftest import tiny_llama
from tests.test_module_tree import tiny_mamba

aten = torch.ops.aten


def perturbed_pair(factory, modalities=3):
    """(hoisted, unhoisted) routed copies of one dense model with the same perturbed modality copies."""
    dense = factory()
    hoisted = sparsify.convert(dense, modalities, hoist=True).train()
    unhoisted = sparsify.convert(dense, modalities, hoist=False, verify=False).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, a), (_, b) in zip(hoisted.named_parameters(), unhoisted.named_parameters()):
            a.add_(0.05 * torch.randn(a.shape, generator=generator))
            b.copy_(a)
    return hoisted, unhoisted


def routed_graph(routed):
    entries = [e for entries in routed._graphs.values() for e in entries]
    return entries[-1].routed.graph_module.graph


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# HF Mamba: no region pays (the block norm is not routed, so each region holds one or two routed ops
# between the scan's transposes), so its hoisted graph must simply be the unhoisted one.
@pytest.mark.parametrize("factory,sorts", [(tiny_llama, True), (tiny_mamba, False)], ids=["llama", "hf-mamba"])
def test_hoisted_outputs_and_gradients_equal_unhoisted(factory, sorts):
    hoisted, unhoisted = perturbed_pair(factory)
    tokens = torch.randint(0, 101, (3, 13))
    ids = torch.randint(0, 3, (3, 13))
    outputs = []
    for model in (hoisted, unhoisted):
        logits = model(tokens, modality_ids=ids).logits
        logits.square().mean().backward()
        outputs.append(logits.detach())
    assert rel(*outputs) <= 1e-6
    for (name, a), (_, b) in zip(hoisted.named_parameters(), unhoisted.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None and b.grad.abs().max() > 0:
            assert rel(a.grad, b.grad) <= 1e-6, name
    assert any(n.target == aten.argsort.stable for n in routed_graph(hoisted).nodes) == sorts
    assert not any(n.target == aten.argsort.stable for n in routed_graph(unhoisted).nodes)


@pytest.mark.parametrize("ids_kind", ["one modality", "sorted"])
def test_hoisted_graph_with_ids_already_in_order_equals_unhoisted(ids_kind, monkeypatch):
    # the hoist's order is then the identity: its permutations pass the rows (and gradients) through as they are
    from sparsify.ops import permute_rows as permute_rows_module
    seen = []
    is_identity = permute_rows_module.is_identity
    monkeypatch.setattr(permute_rows_module, "is_identity", lambda order: seen.append(is_identity(order)) or seen[-1])
    hoisted, unhoisted = perturbed_pair(tiny_llama)
    seen.clear()  # conversion's own check ran on random ids
    tokens = torch.randint(0, 101, (2, 13))
    ids = torch.ones(2, 13, dtype=torch.long) if ids_kind == "one modality" else \
        torch.tensor([0] * 8 + [1] * 10 + [2] * 8).reshape(2, 13)  # flattened, in modality order
    outputs = []
    for model in (hoisted, unhoisted):
        logits = model(tokens, modality_ids=ids).logits
        logits.square().mean().backward()
        outputs.append(logits.detach())
    assert seen and all(seen)  # every permutation of the hoisted run (forward and backward) was found identity
    assert rel(*outputs) <= 1e-6
    for (name, a), (_, b) in zip(hoisted.named_parameters(), unhoisted.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None and b.grad.abs().max() > 0:
            assert rel(a.grad, b.grad) <= 1e-6, name


def test_permutations_in_a_hoisted_llama_graph_are_per_block_not_per_routed_op():
    layers = 3
    routed = sparsify.convert(tiny_llama(num_hidden_layers=layers), 3)
    graph = routed_graph(routed)
    ops = collections.Counter(n.target for n in graph.nodes if n.op == "call_function")
    routed_ops = ops[torch.ops.sparsify.routed_linear.default] + ops[torch.ops.sparsify.routed_rms_norm.default]
    assert routed_ops == 9 * layers  # q k v o gate up down + 2 norms per block: unhoisted, 9 sorts per block
    assert ops[aten.argsort.stable] == 2  # the order, and its inverse: once per forward for every block
    permute = torch.ops.sparsify.permute_rows.default
    into_order = [n for n in graph.nodes if n.target == permute and n.args[0].target == aten.flatten.using_ints]
    back = [n for n in graph.nodes if n.target == permute and n.args[0].target in
            (torch.ops.sparsify.routed_linear.default, aten.add.Tensor)]
    # per block: the block's input and the attention output sorted in; q, k, v (to attention) and the
    # block output put back in token order
    assert len(into_order) == 2 * layers
    assert len(back) == 4 * layers
    assert ops[permute] == 6 * layers
    sorted_ids = {n for n in graph.nodes if n.target == aten.index_select.default}
    assert len(sorted_ids) == 1 and next(iter(sorted_ids)).args[0].target == aten.reshape.default
    for node in graph.nodes:
        if node.target in (torch.ops.sparsify.routed_linear.default, torch.ops.sparsify.routed_rms_norm.default):
            assert node.args[1] in sorted_ids  # every routed op reads rows in modality order


def test_block_outputs_stay_in_token_order():
    hoisted, unhoisted = perturbed_pair(tiny_llama)
    tokens, ids = torch.randint(0, 101, (2, 9)), torch.randint(0, 3, (2, 9))
    seen = []
    for model in (hoisted, unhoisted):
        model(tokens, modality_ids=ids)  # captures the graph for this shape first (hooks fire while tracing)
        handle = model.get_submodule("model.layers.0").register_forward_hook(
            lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output))
        model(tokens, modality_ids=ids)
        handle.remove()
    assert seen[0].shape == (2, 9, 32)
    assert rel(seen[0].detach(), seen[1].detach()) <= 1e-6


def test_a_region_that_would_not_save_copies_is_left_alone():
    class OneProjection(torch.nn.Module):  # one routed op: sorting around it costs what the op costs
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, tokens):
            return self.proj(self.embed(tokens)).cumsum(1)

    routed = sparsify.convert(OneProjection(), 2, example_inputs=(torch.randint(0, 50, (2, 5)),))
    assert routed.hoist
    assert not any(n.target == aten.argsort.stable for n in routed_graph(routed).nodes)


@pytest.mark.parametrize("batch,seq,hoisted", [(2, 3, True), (4, 4, False)])
def test_a_graph_whose_batch_and_sequence_sizes_coincide_is_left_unhoisted(batch, seq, hoisted):
    # Static sizes with batch == seq: a [seq, batch, d] activation would pass for [batch, seq, d] and have its
    # rows put in the wrong order, so such a graph is not hoisted. Three chained routed linears otherwise are.
    from sparsify.passes.hoist import HoistPass
    from sparsify.passes.route import MODALITY_IDS

    graph = torch.fx.Graph()
    value = graph.placeholder("x")
    value.meta["val"] = torch.empty(batch, seq, 8)
    weights = []
    for i in range(3):
        weights.append(graph.placeholder(f"w{i}"))
        weights[-1].meta["val"] = torch.empty(3, 8, 8)
    ids = graph.placeholder(MODALITY_IDS)
    ids.meta["val"] = torch.empty(batch, seq, dtype=torch.long)
    for weight in weights:
        value = graph.call_function(torch.ops.sparsify.routed_linear.default, (value, ids, weight, None))
        value.meta["val"] = torch.empty(batch, seq, 8)
    graph.output(value)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    result = HoistPass()(module)
    assert result.modified == hoisted
    x, ids_value = torch.randn(batch, seq, 8), torch.randint(0, 3, (batch, seq))
    w = [torch.randn(3, 8, 8) for _ in range(3)]
    want = x
    for weight in w:
        want = torch.ops.sparsify.routed_linear(want, ids_value, weight, None, "torch")
    torch.testing.assert_close(result.graph_module(x, *w, ids_value), want, rtol=1e-6, atol=1e-6)
