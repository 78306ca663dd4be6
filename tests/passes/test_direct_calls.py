"""The eager-only copy of a routed graph (sparsify/passes/direct_calls.py): same results, fewer calls."""
import torch

from sparsify.passes.direct_calls import direct_calls


class Casts(torch.nn.Module):
    def forward(self, x):
        same = x.to(torch.float32) * 2  # x is fp32: a no-op cast the graph still calls
        wider = x.to(torch.float64)     # a real cast
        return same, wider


def test_casts_to_the_dtype_a_value_has_are_dropped_and_results_unchanged():
    x = torch.randn(3, 4)
    graph_module = torch.export.export(Casts(), (x,), strict=False).module()
    casts = [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.to.dtype]
    assert len(casts) == 2
    direct = direct_calls(graph_module)
    kept = [n for n in direct.graph.nodes if n.target == torch.ops.aten.to.dtype]
    assert [n.args[1] for n in kept] == [torch.float64]
    for got, want in zip(direct(x), Casts()(x)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert len([n for n in graph_module.graph.nodes if n.target == torch.ops.aten.to.dtype]) == 2  # a copy
