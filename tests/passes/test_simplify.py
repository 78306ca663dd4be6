"""The simplify pass (sparsify/passes/simplify.py): fewer calls, the same results, mutations respected."""
import torch

from sparsify.passes.simplify import simplify

aten = torch.ops.aten


def calls(graph_module, target=None):
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and (target is None or n.target == target)]


def exported(module, *args):
    return torch.export.export(module, args, strict=False).module()


class Views(torch.nn.Module):
    def forward(self, x, ids):
        y = x.transpose(1, 2).transpose(-1, -2)     # undone: x
        y = y.reshape(x.shape) * 2                 # a reshape to the shape it has
        y = y[:, :, -x.shape[2]:]                   # a full slice
        y = y.unsqueeze(1).squeeze(1).float()      # undone, and a cast to the dtype it has
        a = ids.unsqueeze(1).expand(-1, x.shape[1])  # the same ids layout twice (as the route pass writes per op)
        b = ids.unsqueeze(1).expand(-1, x.shape[1])
        kept = x.transpose(0, 1).transpose(1, 2)   # not an identity
        return y + a[..., None] * b[..., None], kept


def test_views_undone_casts_and_repeated_layouts_are_removed_and_results_unchanged():
    x, ids = torch.randn(3, 4, 5), torch.arange(3.0)
    graph_module = exported(Views(), x, ids)
    before = len(calls(graph_module))
    expected = Views()(x, ids)
    simplify(graph_module)
    graph_module.graph.lint()
    assert len(calls(graph_module, aten.transpose.int)) == 2  # only `kept`'s
    for target in (aten.reshape.default, aten.view.default, aten.slice.Tensor, aten.squeeze.dim, aten.to.dtype,
                   aten.sym_size.int):
        assert not calls(graph_module, target), target
    assert len(calls(graph_module, aten.expand.default)) == 1 and len(calls(graph_module, aten.unsqueeze.default)) == 2
    assert len(calls(graph_module)) < before - 8
    for got, want in zip(graph_module(x, ids), expected):
        assert torch.equal(got, want)


class ReadUpdateRead(torch.nn.Module):
    """A decoding step's shape: a state read, updated in place inside the graph, read again."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.ones(4))
        self.register_buffer("scratch", torch.zeros(4))

    def forward(self, x):
        before = self.state * 2
        self.state.add_(x)                      # export hands later reads add_'s result
        after = self.state * 2
        scratch_before = self.scratch * 2
        self.scratch[1:].copy_(x[1:])             # written through a view: later reads are of the buffer again
        scratch_after = self.scratch * 2         # the same call as scratch_before, on the updated buffer
        twice = (x * 3) + (x * 3)                # no mutation in between: merged
        return before + after, scratch_before + scratch_after, twice


def test_common_subexpressions_are_not_merged_across_a_mutation_of_what_they_read():
    x = torch.arange(4.0)
    graph_module = exported(ReadUpdateRead(), x)
    simplify(graph_module)
    graph_module.graph.lint()
    reference = ReadUpdateRead()
    for step in range(2):  # the buffers carry over between calls, in both
        for got, want in zip(graph_module(x), reference(x)):
            assert torch.equal(got, want), step
    assert torch.equal(graph_module.state, reference.state) and torch.equal(graph_module.scratch, reference.scratch)
    times = [n.args[1] for n in calls(graph_module, aten.mul.Tensor)]
    assert times.count(3) == 1 and times.count(2) == 4
