"""Routed ops vs a per-token reference written with plain indexing, forward and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from sparsify import ops

CASES = [  # (token shape, features in, features out, modalities)
    ((2, 7), 5, 3, 3),
    ((1, 1), 4, 6, 1),
    ((13,), 9, 11, 2),
    ((3, 5), 16, 8, 8),
]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 1e-10)]


def make(token_shape, d_in, d_out, modalities, dtype, empty_modality=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*token_shape, d_in, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, modalities, token_shape, generator=g)
    if empty_modality and modalities > 1:
        ids[ids == modalities - 1] = 0  # the last modality gets no token
    w = torch.randn(modalities, d_out, d_in, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(modalities, d_out, generator=g, dtype=dtype, requires_grad=True)
    return x, ids, w, b


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream, retain_graph=True)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("token_shape,d_in,d_out,modalities", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_routed_linear(token_shape, d_in, d_out, modalities, dtype, atol, rtol, with_bias):
    x, ids, w, b = make(token_shape, d_in, d_out, modalities, dtype)
    b = b if with_bias else None
    out = ops.routed_linear(x, ids, w, b)
    expected = torch.einsum("...i,...oi->...o", x, w[ids]) + (b[ids] if with_bias else 0)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    inputs = [x, w] + ([b] if with_bias else [])
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if modalities > 1:  # the empty modality's copy gets exactly zero gradient
        assert torch.count_nonzero(grads(out, [w])[0][modalities - 1]) == 0


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("token_shape,d,_,modalities", CASES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias"])
def test_routed_layer_norm(token_shape, d, _, modalities, dtype, atol, rtol, affine):
    x, ids, _w, _b = make(token_shape, d, d, modalities, dtype)
    g = torch.Generator().manual_seed(5)
    w = (1 + torch.randn(modalities, d, generator=g, dtype=dtype)).requires_grad_() if affine != "bias" else None
    b = torch.randn(modalities, d, generator=g, dtype=dtype, requires_grad=True) if affine != "weight" else None
    out = ops.routed_layer_norm(x, ids, w, b, 1e-5)
    expected = F.layer_norm(x, (d,), eps=1e-5)
    if w is not None:
        expected = expected * w[ids]
    if b is not None:
        expected = expected + b[ids]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    inputs = [t for t in (x, w, b) if t is not None]
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("param_shape", [(5,), (2, 3)])
def test_routed_gather(param_shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, *param_shape, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 2, 0], [0, 0, 2, 0]])  # modality 1 empty
    out = ops.routed_gather(w, ids)
    assert out.shape == (2, 4, *param_shape)
    torch.testing.assert_close(out, w[ids])
    (got,) = grads(out, [w])
    (want,) = grads(w[ids], [w])
    torch.testing.assert_close(got, want)
    assert torch.count_nonzero(got[1]) == 0


def test_ops_pass_torch_library_opcheck():
    x, ids, w, b = make((2, 5), 4, 3, 3, torch.float32)
    torch.library.opcheck(torch.ops.sparsify.routed_linear.default, (x, ids, w, b))
    torch.library.opcheck(torch.ops.sparsify.routed_linear.default, (x, ids, w, None))
    d = 4
    torch.library.opcheck(torch.ops.sparsify.routed_layer_norm.default,
                          (x, ids, torch.randn(3, d, requires_grad=True), torch.randn(3, d, requires_grad=True), 1e-5))
    torch.library.opcheck(torch.ops.sparsify.routed_gather.default, (torch.randn(3, d, requires_grad=True), ids))
    order = torch.randperm(10)
    torch.library.opcheck(torch.ops.sparsify.permute_rows.default,
                          (torch.randn(10, d, requires_grad=True), order, torch.argsort(order)))


def test_ops_reject_out_of_range_ids_instead_of_leaving_garbage():
    x, ids, w, b = make((2, 5), 4, 3, 2, torch.float32)
    ids[0, 0] = 2
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ops.routed_linear(x, ids, w, b)
    ids[0, 0] = -1
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ops.routed_gather(w, ids)


def test_torch_compile_keeps_routed_linear_as_one_op():
    x, ids, w, b = make((2, 5), 4, 3, 3, torch.float32)
    counts = {}

    def backend(gm, example_inputs):
        counts["graphs"] = counts.get("graphs", 0) + 1
        counts["routed"] = sum(str(n.target).split(".")[:2] == ["sparsify", "routed_linear"] for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    # the graph op, as routed models call it (the functional API checks the id range with a host sync)
    op = torch.ops.sparsify.routed_linear
    compiled = torch.compile(lambda x, ids, w, b: op(x, ids, w, b).relu(), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, ids, w, b), op(x, ids, w, b).relu())
    assert counts == {"graphs": 1, "routed": 1}


def span_ids(layout, rows, modalities, seed=0):
    """Modality ids in one of the layouts the CPU references treat differently (ops/_grouping.py)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "iid":  # short runs: one sort, compute per modality, unsort
        return torch.randint(0, modalities, (rows,), generator=g)
    if layout == "sorted":  # each modality one run (a hoisted region): in place
        return torch.randint(0, modalities, (rows,), generator=g).sort().values
    # spans of 64..200 rows cycling through the modalities, each modality owning several runs: in place
    ids, m = [], 0
    while len(ids) < rows:
        ids += [m] * int(torch.randint(64, 200, (), generator=g))
        m = (m + 1) % modalities
    return torch.tensor(ids[:rows])


@pytest.mark.parametrize("layout,in_place", [("iid", False), ("sorted", True), ("spans", True)])
def test_routed_ops_on_runs_of_rows_match_per_token_reference(layout, in_place):
    """Spans of one modality are computed on views of the rows (several runs per modality, so weight
    gradients accumulate over runs); short runs go through the sort. Both equal the per-token reference."""
    from sparsify.ops._grouping import groups_of

    rows, d, modalities = 900, 12, 3
    ids = span_ids(layout, rows, modalities).reshape(3, rows // 3)
    assert (groups_of(ids, modalities).runs is not None) == in_place
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, rows // 3, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(modalities, 7, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(modalities, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ln_w = (1 + torch.randn(modalities, d, generator=g, dtype=torch.float64)).requires_grad_()
    ln_b = torch.randn(modalities, d, generator=g, dtype=torch.float64, requires_grad=True)
    cases = [
        (ops.routed_linear(x, ids, w, b), torch.einsum("...i,...oi->...o", x, w[ids]) + b[ids], [x, w, b]),
        (ops.routed_layer_norm(x, ids, ln_w, ln_b, 1e-5),
         F.layer_norm(x, (d,), eps=1e-5) * ln_w[ids] + ln_b[ids], [x, ln_w, ln_b]),
        (ops.routed_rms_norm(x, ids, ln_w, 1e-6),
         x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * ln_w[ids], [x, ln_w]),
    ]
    for out, expected, inputs in cases:
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        for got, want in zip(grads(out, inputs), grads(expected, inputs)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_routed_linear_outputs_never_share_its_scratch_buffers():
    """The CPU reference reuses buffers for its sorted rows across calls: an output or gradient kept from
    one call must be unchanged by the next."""
    g = torch.Generator().manual_seed(0)
    ids = span_ids("iid", 256, 3)
    w = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    x1, x2 = (torch.randn(256, 4, generator=g, requires_grad=True) for _ in range(2))
    first = ops.routed_linear(x1, ids, w)
    first_grad = torch.autograd.grad(first, x1, torch.ones_like(first))[0]
    kept, kept_grad = first.detach().clone(), first_grad.clone()
    second = ops.routed_linear(x2, ids, w)
    torch.autograd.grad(second, x2, torch.full_like(second, 3.0))
    assert torch.equal(first, kept) and torch.equal(first_grad, kept_grad)


def test_scratch_buffers_are_reused_bounded_and_releasable():
    from sparsify.ops import _grouping

    _grouping.release_scratch_buffers()
    first = _grouping.scratch_buffer("t", (4, 8), torch.float32, "cpu")
    again = _grouping.scratch_buffer("t", (2, 8), torch.float32, "cpu")
    assert again.data_ptr() == first.data_ptr()  # reused, not reallocated
    too_big = (_grouping.SCRATCH_MAX_BYTES // 4 + 1,)
    assert _grouping.scratch_buffer("big", too_big, torch.float32, "meta").device.type == "meta"
    big = _grouping.scratch_buffer("big", too_big, torch.uint8, "cpu")  # under the cap in bytes: held
    huge = _grouping.scratch_buffer("huge", (too_big[0] * 4,), torch.uint8, "cpu")  # over it: per call
    held = _grouping._SCRATCH.buffers
    assert ("big", torch.uint8) in held and ("huge", torch.uint8) not in held
    del big, huge
    _grouping.release_scratch_buffers()
    assert not getattr(_grouping._SCRATCH, "buffers", {})


def test_views_of_one_modality_ids_reuse_their_groups_without_counting(monkeypatch):
    """A decoding step hands each routed op a view of the step's ids (select / unsqueeze / expand); when the
    ids' groups are known to hold one modality, a view's groups are derived without a bincount (a host sync
    per op). Ids of several modalities are still counted per view."""
    from sparsify.ops._grouping import groups_of

    single = torch.full((4, 1), 2)
    assert groups_of(single, 3).single == 2
    mixed = torch.tensor([[0], [1], [1], [0]])
    groups_of(mixed, 3)

    def no_bincount(*args, **kwargs):
        raise AssertionError("counted a view of single-modality ids")

    view = single.select(1, 0).unsqueeze(1).expand(-1, 5)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bincount", no_bincount)
        groups = groups_of(view, 3)
    assert groups.single == 2 and groups.counts == [0, 0, 20] and groups.runs == [(2, 0, 20)]
    mixed_view = mixed.select(1, 0).unsqueeze(1).expand(-1, 5)
    assert groups_of(mixed_view, 3).counts == [10, 10, 0]
    # A step's ids sliced from the generation history are made a tensor of their own (owned) as they enter a
    # graph, so the layouts of them are views of a root whose groups are memoised.
    from sparsify.ops._grouping import owned

    history = torch.tensor([[0, 1, 1], [2, 1, 1]])
    step_ids = owned(history[:, 1:])
    assert step_ids._base is None and torch.equal(step_ids, history[:, 1:])
    assert owned(step_ids) is step_ids
    assert groups_of(step_ids, 3).single == 1
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bincount", no_bincount)
        assert groups_of(step_ids.select(1, 0).unsqueeze(1).expand(-1, 4), 3).single == 1


@pytest.mark.parametrize("ids_kind", ["one modality", "mixed"])
def test_routed_rms_norm_fp32_equals_the_step_by_step_norm_bitwise(ids_kind):
    """fp32 takes ATen's one-call rms_norm (a decoding step's norms are dispatch-bound); it must give what the
    model's own RMSNorm steps give, bit for bit, so routed decoding matches dense decoding token for token."""
    from sparsify.ops.routed_rms_norm import routed_rms_norm_ref

    torch.manual_seed(0)
    x, weight = torch.randn(3, 7, 257), torch.randn(3, 257)
    ids = torch.ones(3, 7, dtype=torch.long) if ids_kind == "one modality" else torch.randint(0, 3, (3, 7))
    steps = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight[ids]
    assert torch.equal(routed_rms_norm_ref(x, ids, weight, 1e-6), steps)


# A decoding step: one row per sequence. Rows (token shape) and their modality ids: one modality; consecutive
# modalities (one GEMM over their stacked weights); modalities with a gap (one GEMM each); and a batch of 20
# sorted into slices of 1-10 rows.
FEW_ROW_CASES = [
    ((2, 1), [[1], [1]]),
    ((4, 1), [[0], [1], [2], [0]]),
    ((3,), [2, 0, 2]),
    ((2,), [1, 2]),
    ((8, 1), [[0], [1], [2], [0], [1], [2], [0], [3]]),
    ((20,), [0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 1, 0, 2, 0, 2, 0, 2, 0, 2, 2]),
]


@pytest.mark.parametrize("token_shape,ids", FEW_ROW_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("call", ["op", "direct"])
def test_routed_linear_of_a_few_rows_as_decoding_steps_call_it(monkeypatch, token_shape, ids, with_bias, call):
    """The reference computes products of 2-16 rows as W @ X^T (routed_linear.FEW_ROWS): equal to the per-token
    product, contiguous as the op's fake says; through the op, gradients too (its backward); called directly,
    as a decode graph's direct calls run it under generate's no_grad, the forward."""
    import importlib

    from sparsify.ops.routed_linear import routed_linear_direct

    module = importlib.import_module("sparsify.ops.routed_linear")
    transposed = []
    original = module._transposed_product
    monkeypatch.setattr(module, "_transposed_product", lambda *a: transposed.append(1) or original(*a))
    x, _, w, b = make(token_shape, 24, 40, 4, torch.float32)
    ids = torch.tensor(ids)
    b = b if with_bias else None
    with torch.no_grad() if call == "direct" else torch.enable_grad():
        out = (ops.routed_linear if call == "op" else routed_linear_direct)(x, ids, w, b)
    assert transposed, "the few-rows form was not taken"
    assert out.is_contiguous() and out.shape == (*token_shape, 40)
    expected = torch.einsum("...i,...oi->...o", x, w[ids]) + (b[ids] if with_bias else 0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if call == "direct":
        return
    inputs = [x, w] + ([b] if with_bias else [])
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
