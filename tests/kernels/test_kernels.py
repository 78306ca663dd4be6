"""Triton kernels vs their torch references: forward and every gradient, fp32 and fp16.

On a machine without a GPU the kernels run through the Triton interpreter (set in
tests/conftest.py). fp16 error is bounded by twice the torch reference's own fp16
error (both measured against an fp64 computation) plus atol; bf16 is not tested
under the interpreter, whose bf16 dot is wrong.
"""
import pytest
import torch

from sparsify import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-2)]
SHAPES = [  # (token shape, modalities): odd sizes, one token, an empty modality (the last, when M > 1)
    ((2, 7), 3),
    ((1, 1), 1),
    ((37,), 2),
    ((3, 5), 8),
]


def tokens(shape, modalities, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, modalities, shape, generator=g)
    if modalities > 1:
        ids[ids == modalities - 1] = 0
    return ids.to(DEVICE), g


def rand(g, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE)


def check(fn, inputs, dtype, atol, seed=0):
    """fn(*inputs, backend) on triton vs torch: outputs and gradients w.r.t. every float input."""
    exact = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]  # fp64 truth (torch reference)
    low = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    low_ref = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in low]
    out_exact = fn(*exact, "torch")
    out_triton = fn(*low, "triton")
    out_ref = fn(*low_ref, "torch")
    assert out_triton.dtype == out_ref.dtype and out_triton.shape == out_exact.shape
    upstream = torch.randn(out_exact.shape, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64).to(DEVICE)
    floats = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    grads_exact = torch.autograd.grad(out_exact, [exact[i] for i in floats], upstream)
    grads_triton = torch.autograd.grad(out_triton, [low[i] for i in floats], upstream.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, [low_ref[i] for i in floats], upstream.to(dtype))
    pairs = [(out_triton, out_ref, out_exact)] + list(zip(grads_triton, grads_ref, grads_exact))
    for name, (got, ref, truth) in zip(["output"] + [f"grad {i}" for i in floats], pairs):
        kernel_err = float((got.double() - truth).abs().max()) if truth.numel() else 0.0
        ref_err = float((ref.double() - truth).abs().max()) if truth.numel() else 0.0
        scale = float(truth.abs().max()) if truth.numel() else 0.0
        assert kernel_err <= 2 * ref_err + atol * max(scale, 1.0), (name, kernel_err, ref_err)


@pytest.mark.parametrize("splits", [1, 3])
def test_routed_linear_backward_skips_frozen_modalities(splits):
    """Frozen modalities' weight and bias gradients are zero in the kernel and the reference alike; dx and the
    other modalities' gradients are as without freezing."""
    from sparsify.kernels.routed_linear import routed_linear_backward
    from sparsify.ops.routed_linear import routed_linear_backward_ref

    ids, g = tokens((2, 40), 3, 11)
    x, w, grad = rand(g, 2, 40, 19), rand(g, 3, 21, 19, scale=0.3), rand(g, 2, 40, 21)
    full = routed_linear_backward_ref(grad, x, ids, w, True)
    for got in (routed_linear_backward(grad.float(), x.float(), ids, w.float(), True, splits=splits, frozen=[0, 2]),
                routed_linear_backward_ref(grad, x, ids, w, True, frozen=[0, 2])):
        dx, dweight, dbias = (t.double() for t in got)
        torch.testing.assert_close(dx, full[0], rtol=1e-5, atol=1e-5)
        assert not dweight[[0, 2]].any() and not dbias[[0, 2]].any()
        torch.testing.assert_close(dweight[1], full[1][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dbias[1], full[2][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape,modalities", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_routed_linear_kernel(shape, modalities, dtype, atol, with_bias):
    ids, g = tokens(shape, modalities, 0)
    x, w = rand(g, *shape, 19), rand(g, modalities, 21, 19, scale=0.3)
    b = rand(g, modalities, 21) if with_bias else None

    def fn(x, w, *rest):
        *maybe_b, backend = rest
        return torch.ops.sparsify.routed_linear(x, ids, w, maybe_b[0] if maybe_b else None, backend)

    check(fn, [x, w] + ([b] if with_bias else []), dtype, atol)


def test_routed_linear_kernel_tile_order_over_many_tiles():
    # 300 tokens in 16-row interpreter tiles: 22 row tiles, 3 bands of the swizzled tile order, 3 column tiles
    ids, g = tokens((2, 150), 3, 5)
    x, w, b = rand(g, 2, 150, 19), rand(g, 3, 40, 19, scale=0.3), rand(g, 3, 40)
    check(lambda x, w, b, backend: torch.ops.sparsify.routed_linear(x, ids, w, b, backend),
          [x, w, b], torch.float32, 1e-5)


@pytest.mark.parametrize("splits", [2, 5])
def test_routed_linear_weight_grad_split_over_rows(splits):
    # the GPU picks splits > 1 for weights with few tiles; more splits than a modality has rows included
    from sparsify.kernels.routed_linear import routed_linear_backward
    from sparsify.ops.routed_linear import routed_linear_backward_ref

    ids = torch.zeros(3, 29, dtype=torch.long, device=DEVICE)
    ids[0, 4] = ids[1, 10] = ids[2, 28] = 1  # modality 1: 3 rows (fewer than 5 splits); modality 2: none
    g = torch.Generator().manual_seed(7)
    x, w, grad = rand(g, 3, 29, 19), rand(g, 3, 21, 19, scale=0.3), rand(g, 3, 29, 21)
    got = routed_linear_backward(grad.float(), x.float(), ids, w.float(), True, splits=splits)
    truth = routed_linear_backward_ref(grad, x, ids, w, True)
    for name, a, b in zip(["dx", "dweight", "dbias"], got, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape,modalities", SHAPES)
def test_routed_layer_norm_kernel(shape, modalities, dtype, atol):
    ids, g = tokens(shape, modalities, 1)
    x, w, b = rand(g, *shape, 23), 1 + rand(g, modalities, 23, scale=0.2), rand(g, modalities, 23)
    check(lambda x, w, b, backend: torch.ops.sparsify.routed_layer_norm(x, ids, w, b, 1e-5, backend),
          [x, w, b], dtype, atol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape,modalities", SHAPES)
def test_routed_rms_norm_kernel(shape, modalities, dtype, atol):
    ids, g = tokens(shape, modalities, 2)
    x, w = rand(g, *shape, 23), 1 + rand(g, modalities, 23, scale=0.2)
    check(lambda x, w, backend: torch.ops.sparsify.routed_rms_norm(x, ids, w, 1e-6, backend), [x, w], dtype, atol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("batch,channels,length,modalities", [(2, 5, 7, 3), (1, 3, 1, 1), (3, 20, 19, 2),
                                                               (1, 4, 6, 8)])
def test_routed_conv1d_kernel(batch, channels, length, modalities, dtype, atol):
    ids, g = tokens((batch, length), modalities, 3)
    x, w, b = rand(g, batch, channels, length), rand(g, modalities, channels, 4), rand(g, modalities, channels)
    check(lambda x, w, b, backend: torch.ops.sparsify.routed_conv1d(x, ids, w, b, backend), [x, w, b], dtype, atol)


def test_functional_api_backends_agree_and_check_ids():
    ids, g = tokens((2, 9), 3, 4)
    x, w, b = rand(g, 2, 9, 8).float(), rand(g, 3, 5, 8).float(), rand(g, 3, 5).float()
    torch.testing.assert_close(ops.routed_linear(x, ids, w, b, backend="triton"),
                               ops.routed_linear(x, ids, w, b, backend="torch"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.routed_linear(x, ids, w, b, backend="cuda")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        ops.routed_linear(x, ids + 3, w, b, backend="triton")


def test_tf32_follows_torch_matmul_precision_in_either_api():
    # A subprocess: once the new fp32_precision API is used, torch raises on reads of the legacy allow_tf32
    # (inductor reads it), so this must not leak into the other tests.
    import subprocess
    import sys

    code = ("import torch; from sparsify.kernels.routed_linear import _full_fp32 as f; a = f(torch.float32); "
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'; b = f(torch.float32); "
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'; c = f(torch.float32); "
            "torch.set_float32_matmul_precision('high'); d = f(torch.float32); print(a, b, c, d, f(torch.float16))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False", "True", "False", "False"]
