"""Token provenance on toy graphs: the labels each op gives its output, whatever the sizes."""
import torch
import torch.nn as nn

import sparsify
from sparsify.capture import capture
from sparsify.passes.token_axes import TokenAxes, axes_from_tokens, find_token_axes
from sparsify.passes.token_provenance import Tokens, token_provenance, tokens_of
from tests import toy_models
from tests.test_sound_shapes import OneChunkPad

aten = torch.ops.aten


def annotated(model, x):
    captured = capture(model, {next(iter(__import__("inspect").signature(model.forward).parameters)): x})
    token_provenance(captured.graph_module, captured.user_input_nodes(), captured.token_dims)
    return captured


def nodes(captured, target):
    return [n for n in captured.graph_module.graph.nodes if n.target == target]


def labels(node):
    return tokens_of(node).labels


def test_flattened_batch_major_and_channels_first():
    captured = annotated(toy_models.ToyLM(), torch.randint(0, 50, (2, 5)))
    addmm = nodes(captured, aten.addmm.default)[0]
    assert labels(addmm.args[1]) == ("BT", None)                      # h.view(-1, d): [B*T, d]
    left = nodes(captured, aten.matmul.default)[0]
    assert labels(left.args[1]) == ("B", None, "T")                   # flat.transpose(1, 2): [B, d, T]
    assert labels(left) == ("B", None, "T")


def test_flattened_seq_major():
    captured = annotated(toy_models.SeqFirstFlattened(), torch.randn(3, 5, 6))
    addmm = nodes(captured, aten.addmm.default)[0]
    assert labels(addmm.args[1]) == ("TB", None)
    assert axes_from_tokens(tokens_of(addmm.args[1]), captured.token_dims, (15, 6)) == \
        TokenAxes((0,), seq_major=True)


def test_select_in_a_loop_over_time_names_the_position():
    captured = annotated(toy_models.StepwiseRecurrent(), torch.randn(2, 4, 6))
    norms = nodes(captured, aten.layer_norm.default)
    assert [tokens_of(n.args[0]).position for n in norms] == [0, 1, 2, 3]
    assert labels(norms[2].args[0]) == ("B", None)
    recurrent = [n for n in nodes(captured, aten.linear.default) if "rec" in str(n.meta["nn_module_stack"])]
    assert all(tokens_of(n.args[0]).position in (0, -1) for n in recurrent)  # a state mixes positions


def test_padding_chunks_and_back():
    captured = annotated(OneChunkPad(), torch.randn(2, 13, 4))               # padded to 16: two chunks
    pad = nodes(captured, aten.pad.default) or nodes(captured, aten.constant_pad_nd.default)
    assert labels(pad[0]) == ("B", "T+", None)
    chunked = next(u for u in pad[0].users if u.target == aten.view.default)
    assert labels(chunked) == ("B", "T+:chunk", "T+:within", None)
    cut = nodes(captured, aten.slice.Tensor)[-1]
    assert labels(cut.args[0]) == ("B", "T+", None) and labels(cut) == ("B", "T", None)


class OneStepHeads(nn.Module):
    """A decoding step as Mamba2's: the one new token's [B, 1, H * D] viewed as heads [B, H, D], back, projected."""

    def __init__(self):
        super().__init__()
        self.out_proj = nn.Linear(32, 32)

    def forward(self, x):
        heads = x.view(x.shape[0], 4, 8) * 2.0
        return self.out_proj(heads.view(x.shape[0], 1, 32))


def test_a_one_token_sequence_viewed_as_heads_is_not_cut_into_chunks():
    """A sequence of length 1 reshaped with a feature dim: the outputs are features, not the sequence cut
    into chunks (which made the projection's rows look like a chunked sequence, unroutable)."""
    captured = annotated(OneStepHeads(), torch.randn(2, 1, 32))
    heads = nodes(captured, aten.view.default)[0]
    assert labels(heads) == ("B", None, None)
    linear = nodes(captured, aten.linear.default)[0]
    assert axes_from_tokens(tokens_of(linear.args[0]), captured.token_dims, (2, 1, 32)) == \
        TokenAxes((0,), seq_index=0)  # each batch row holds its one token


def test_sizes_are_ambiguous_where_provenance_is_not():
    model = toy_models.LoopOverTime(d=6)  # a Python loop over time: export specialises the length
    x = torch.randn(6, 6, 6)                                          # batch == seq == width
    captured = annotated(model, x)
    linear = nodes(captured, aten.linear.default)[0]
    shape = tuple(captured.graph_module.graph.find_nodes(op="placeholder")[-1].meta["val"].shape)
    assert "ambiguously" in find_token_axes((6, 6, 6), (6, 6))
    assert axes_from_tokens(tokens_of(linear.args[0]), captured.token_dims, shape) == TokenAxes((0, 1))
    routed = sparsify.convert(model, 3, example_inputs=(x,))
    ids = torch.randint(0, 3, (6, 6))
    with torch.no_grad():
        torch.testing.assert_close(routed(x, modality_ids=ids), model(x), rtol=1e-5, atol=1e-6)


def test_attention_scores_are_not_per_token():
    captured = annotated(toy_models.AttentionThenExperts(), torch.randint(0, 50, (2, 5)))
    softmax = next(n for n in captured.graph_module.graph.nodes if n.target == aten.softmax.int)
    scores = tokens_of(softmax)
    assert scores.labels == ("B", "T", "T")
    assert "more than once" in axes_from_tokens(scores, captured.token_dims, (2, 5, 5))
    assert "recurrent state" in axes_from_tokens(Tokens(("B", None)), captured.token_dims, (2, 8))


class UnknownOpThenLoop(nn.Module):
    """An op provenance has no rule for (repeat, changing the shape), then a loop that specialises the
    length to 4, the width after the repeat: sizes alone are ambiguous."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        h = self.layers[0](x.repeat(1, 1, 2))
        return torch.stack([h[:, t] for t in range(x.shape[1])], 1)


def test_where_provenance_stops_the_reason_names_the_op():
    from sparsify.plan import build_plan

    model, x = UnknownOpThenLoop(), torch.randn(2, 4, 2)
    plan = build_plan(capture(model, {"x": x}), model, 3, policy="all")
    reason = next(p.reason for p in plan.shared if p.fqn == "layers.0.weight")
    assert "token provenance stops at node 'repeat'" in reason and "ambiguously" in reason, reason


class HeadsMergedIntoBatch(nn.Module):
    """BLOOM's attention: heads flattened into the batch for bmm ([B * H, S, D]), split back out, merged into
    the features, then the output projection."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])

    def forward(self, x):
        batch, seq, d = x.shape
        v = self.layers[0](x).view(batch, seq, self.heads, d // self.heads).permute(0, 2, 1, 3)
        v = v.reshape(batch * self.heads, seq, d // self.heads)
        scores = torch.bmm(v, v.transpose(1, 2)).softmax(-1)
        y = torch.bmm(scores, v).view(batch, self.heads, seq, d // self.heads).permute(0, 2, 1, 3)
        return self.layers[1](y.reshape(batch, seq, d))


def test_the_batch_merged_with_heads_is_split_back_out():
    model = HeadsMergedIntoBatch().eval()
    captured = annotated(model, torch.randn(2, 5, 8))
    first_bmm, second_bmm = nodes(captured, aten.bmm.default)
    assert labels(first_bmm.args[0]) == ("B:merged", "T", None)           # [B * H, S, D]: no dim is the batch
    out_proj = nodes(captured, aten.linear.default)[1]
    assert labels(out_proj.args[0]) == ("B", "T", None)                   # split back out: routable
    routed = sparsify.convert(model, 3, example_inputs=(torch.randn(2, 5, 8),), policy="all")
    assert set(routed.plan.routed) == {n for n, _ in model.named_parameters()}
    x, ids = torch.randn(3, 7, 8), torch.randint(0, 3, (3, 7))
    with torch.no_grad():
        assert torch.allclose(routed(x, modality_ids=ids), model(x), atol=1e-6)
