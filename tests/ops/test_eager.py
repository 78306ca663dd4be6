"""Eager forms of the routed ops (sparsify/ops/eager.py): the custom op's results and gradients without its
dispatch, and the custom op itself wherever a tracer runs."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify.ops.eager import EAGER

sparsify_ops = torch.ops.sparsify


class RecordOps(TorchDispatchMode):
    """The names of the ops dispatched (custom ops included) while active."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def cases():
    g = torch.Generator().manual_seed(0)

    def p(*shape):
        return torch.randn(*shape, generator=g, requires_grad=True)

    ids = torch.tensor([[0, 2, 2, 1, 0, 0, 2], [1, 1, 0, 2, 2, 0, 1]])
    return [
        (sparsify_ops.routed_linear.default, (p(2, 7, 5), ids, p(3, 4, 5), p(3, 4)), {"backend": "torch"}),
        (sparsify_ops.routed_linear.default, (p(2, 7, 5), ids.clamp(max=0), p(3, 4, 5)), {"backend": "torch"}),
        (sparsify_ops.routed_rms_norm.default, (p(2, 7, 6), ids, p(3, 6), 1e-6), {"backend": "torch"}),
        (sparsify_ops.routed_layer_norm.default, (p(2, 7, 6), ids, p(3, 6), p(3, 6), 1e-5), {"backend": "torch"}),
        (sparsify_ops.routed_conv1d.default, (p(2, 5, 7), ids, p(3, 5, 4), p(3, 5)), {"backend": "torch"}),
        (sparsify_ops.routed_gather.default, (p(3, 6), ids), {}),
        (sparsify_ops.permute_rows.default, (p(14, 3), *_permutation(14, g)), {}),
    ]


def _permutation(n, generator):
    order = torch.randperm(n, generator=generator)
    return order, torch.argsort(order)


@pytest.mark.parametrize("case", range(len(cases())))
def test_eager_form_equals_the_custom_op_forward_and_every_gradient_without_calling_it(case):
    op, args, kwargs = cases()[case]
    expected = op(*args, **kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, leaves, upstream)

    with RecordOps() as record:
        out = EAGER[op](*args, **kwargs)
        got_grads = torch.autograd.grad(out, leaves, upstream)
    assert not [name for name in record.names if name.startswith("sparsify::")], record.names
    assert type(out.grad_fn).__name__ == "_EagerBackward"
    assert torch.equal(out, expected)
    for got, want in zip(got_grads, expected_grads):
        assert torch.equal(got, want)


def test_the_custom_op_is_seen_by_a_dispatch_mode():  # what the test above relies on
    op, args, kwargs = cases()[0]
    with RecordOps() as record:
        op(*args, **kwargs)
    assert "sparsify::routed_linear" in record.names


def test_under_a_tracer_the_eager_form_is_the_custom_op():
    op, args, kwargs = cases()[0]
    traced = make_fx(lambda *a: EAGER[op](*a, **kwargs), tracing_mode="fake")(*args)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [op]

    class Module(torch.nn.Module):
        def forward(self, x, ids, w, b):
            return EAGER[op](x, ids, w, b, **kwargs)
    exported = torch.export.export(Module(), args, strict=False)
    assert op in [n.target for n in exported.graph.nodes if n.op == "call_function"]
    compiled = torch.compile(Module(), backend="eager", fullgraph=True)
    assert torch.equal(compiled(*args), op(*args, **kwargs))


def test_triton_lowered_calls_keep_the_custom_op():
    from sparsify.ops.eager import eager_form_of

    op = sparsify_ops.routed_linear.default
    assert eager_form_of(op, {"backend": "triton"}) is None
    assert eager_form_of(op, {"backend": "torch"}) is EAGER[op]
    assert eager_form_of(torch.ops.aten.linear.default, {}) is None


def test_permute_rows_eager_form_returns_rows_in_identity_order_themselves_and_their_gradient_passes_through():
    # a one-modality batch: the hoist's order is the identity, so its permutations would be plain copies
    rows = torch.randn(6, 4, requires_grad=True)
    identity = torch.arange(6)
    out = EAGER[sparsify_ops.permute_rows.default](rows, identity, identity)
    assert out.data_ptr() == rows.data_ptr()
    upstream = torch.randn(6, 4)
    (grad,) = torch.autograd.grad(out, rows, upstream)
    assert torch.equal(grad, upstream)
    # the custom op itself never aliases its input (torch.library's rule for ops without an alias annotation)
    assert sparsify_ops.permute_rows(rows, identity, identity).data_ptr() != rows.data_ptr()
