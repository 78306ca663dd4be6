"""Triton routed linear: grouped GEMM over tokens grouped by modality, one launch per GEMM.

Tokens are ordered by modality on the device (a stable argsort, per-modality
counts by index_add: no host sync). A fixed grid of cdiv(N, BLOCK_M) + M row
tiles (times the column tiles, in an L2-friendly order) covers every group
whatever its size: each program walks the M group counts to find its group and
tile (BLOCK_M is the autotuned config's own, so tiling is always consistent),
gathers its rows through the sort permutation while loading and scatters them
back while storing. No sorted copy of x or y is materialised.

    forward  y[t]  = x[t] @ W[g(t)].T + b[g(t)]     _grouped_matmul_kernel
    backward dx[t] = dy[t] @ W[g(t)]                _grouped_matmul_kernel, W read untransposed
             dW[g] = sum_{t in g} dy[t]^T x[t]      _grouped_weight_grad_kernel, split over rows for small W
             db[g] = sum_{t in g} dy[t]             index_add in fp32
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.errors import SparsifyError
from sparsify.kernels import INTERPRET, configs

_MATMUL_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
)


@triton.autotune(configs=_MATMUL_CONFIGS, key=["ROWS_BUCKET", "N_OUT", "K", "M"])
@triton.jit
def _grouped_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, order_ptr, group_start_ptr, group_count_ptr,
    ROWS, ROWS_BUCKET, N_OUT, K, M,
    stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_biasg, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
):
    """out[r] = a[r] @ B[g] (+ bias[g]) for the rows r of group g; B[g][k, n] at b + g*sbg + k*sbk + n*sbn."""
    # Tile order: SWIZZLE row tiles sweep the column tiles together, so the programs running at one time
    # share their row and weight tiles in L2 (row-major order would stream all of a once per column tile).
    row_tiles = tl.cdiv(ROWS, BLOCK_M) + M
    col_tiles = tl.cdiv(N_OUT, BLOCK_N)
    pid = tl.program_id(0)
    band = pid // (SWIZZLE * col_tiles)
    band_rows = tl.minimum(row_tiles - band * SWIZZLE, SWIZZLE)
    pid_m = band * SWIZZLE + (pid % (SWIZZLE * col_tiles)) % band_rows
    pid_n = (pid % (SWIZZLE * col_tiles)) // band_rows
    # Find this tile's group: groups own cdiv(count, BLOCK_M) consecutive tiles, in order.
    group = -1
    local_tile = 0
    first_tile = 0
    for m in range(0, M):
        tiles = tl.cdiv(tl.load(group_count_ptr + m), BLOCK_M)
        hit = (pid_m >= first_tile) & (pid_m < first_tile + tiles)
        group = tl.where(hit, m, group)
        local_tile = tl.where(hit, pid_m - first_tile, local_tile)
        first_tile += tiles
    if group < 0:  # spare tile of the fixed-size grid
        return
    count = tl.load(group_count_ptr + group)
    offs_m = local_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < count
    rows = tl.load(order_ptr + tl.load(group_start_ptr + group) + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    b_group = b_ptr + group.to(tl.int64) * stride_bg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k + offs_k)[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_group + (k + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products, as F.linear computes them unless TF32 is allowed
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + group * stride_biasg + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_MATMUL_CONFIGS, key=["ROWS_BUCKET", "N_OUT", "N_IN", "M", "SPLITS"])
@triton.jit
def _grouped_weight_grad_kernel(
    grad_ptr, x_ptr, dw_ptr, order_ptr, group_start_ptr, group_count_ptr,
    ROWS_BUCKET, N_OUT, N_IN, M, SPLITS,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_dwg, stride_dwo, stride_dwi,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[s*M + g, o, i] = sum over split s of the rows r of group g of grad[r, o] * x[r, i].

    The K loop walks the rows. With SPLITS > 1 each group's rows are cut into SPLITS
    chunks (sized on the device from the group's count), each summed by its own program
    into its own slice; the caller adds the slices.
    """
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    group = tl.program_id(2) % M
    split = tl.program_id(2) // M
    count = tl.load(group_count_ptr + group)
    start = tl.load(group_start_ptr + group)
    chunk = tl.cdiv(count, SPLITS)
    first_row = split * chunk
    end_row = tl.minimum(first_row + chunk, count)
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < N_OUT
    i_ok = offs_i < N_IN
    offs_r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(first_row, end_row, BLOCK_K):
        r_ok = (r + offs_r) < end_row
        rows = tl.load(order_ptr + start + r + offs_r, mask=r_ok, other=0).to(tl.int64)
        grad_t = tl.load(grad_ptr + rows[None, :] * stride_gm + offs_o[:, None] * stride_gn,
                         mask=r_ok[None, :] & o_ok[:, None], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_i[None, :] * stride_xk,
                    mask=r_ok[:, None] & i_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(grad_t, x, input_precision="ieee")
        else:
            acc += tl.dot(grad_t, x)
    dw = dw_ptr + tl.program_id(2).to(tl.int64) * stride_dwg + offs_o[:, None] * stride_dwo \
        + offs_i[None, :] * stride_dwi
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & i_ok[None, :])


def _full_fp32(dtype: torch.dtype) -> bool:
    """fp32 products in full precision, or in TF32 where the user allowed it for matmuls (as cuBLAS does)."""
    if dtype != torch.float32:
        return False
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 spells it fp32_precision, which every way of setting it updates; reading the legacy
    # allow_tf32 there raises once the new API has been used.
    precision = getattr(matmul, "fp32_precision", None)
    return precision != "tf32" if precision is not None else not matmul.allow_tf32


def rows_bucket(rows: int) -> int:
    """Autotuning key for the token count: the next power of two, so a new batch shape reuses the config
    tuned for its size class instead of tuning again (and a small first call does not fix the config for
    large ones). Only the key reads it."""
    return triton.next_power_of_2(max(rows, 1))


def group_tokens(flat_ids: torch.Tensor, modalities: int):
    """(sort permutation, start, count) of each modality's rows: int32 tensors on the device, no host sync."""
    order = torch.argsort(flat_ids, stable=True).to(torch.int32)
    counts = torch.zeros(modalities, dtype=torch.int32, device=flat_ids.device)
    counts.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return order, starts, counts


def _grouped_matmul(a, grouping, b, stride_bk, stride_bn, n_out, bias, out_dtype):
    order, starts, counts = grouping
    modalities = counts.numel()
    out = torch.empty(a.shape[0], n_out, device=a.device, dtype=out_dtype)
    if a.shape[0] == 0 or n_out == 0:
        return out
    if a.shape[1] == 0:
        return _empty_k(out, grouping, bias)

    def grid(meta):
        # cdiv(rows, BLOCK_M) + M row tiles always cover every group's cdiv(count, BLOCK_M) tiles
        return ((triton.cdiv(a.shape[0], meta["BLOCK_M"]) + modalities) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _grouped_matmul_kernel[grid](
        a, b, bias if bias is not None else a, out, order, starts, counts,
        a.shape[0], rows_bucket(a.shape[0]), n_out, a.shape[1], modalities,
        a.stride(0), a.stride(1), b.stride(0), stride_bk, stride_bn,
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=_full_fp32(a.dtype), SWIZZLE=8,
    )
    return out


def _empty_k(out, grouping, bias):
    """in_features == 0: the product is empty, the output is the bias (or zero)."""
    out.zero_()
    if bias is not None:
        order, starts, counts = grouping
        ids = torch.repeat_interleave(torch.arange(counts.numel(), device=out.device), counts.long(),
                                      output_size=out.shape[0])
        out[order.long()] = bias[ids].to(out.dtype)
    return out


def check_inputs(x: torch.Tensor, modality_ids: torch.Tensor, weight: torch.Tensor, bias) -> None:
    if weight.dim() != 3 or x.shape[-1] != weight.shape[2]:
        raise SparsifyError(f"routed_linear: weight must be [M, out, in] with in = x.shape[-1] = {x.shape[-1]}, "
                            f"got {tuple(weight.shape)}")
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise SparsifyError(f"routed_linear: modality_ids must have shape {tuple(x.shape[:-1])} (x without its "
                            f"last dim), got {tuple(modality_ids.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise SparsifyError(f"routed_linear: bias must be [M, out] = {tuple(weight.shape[:2])}, "
                            f"got {tuple(bias.shape)}")
    if len({x.device, weight.device, modality_ids.device}) != 1:
        raise SparsifyError("routed_linear: x, modality_ids and weight must be on one device")


def routed_linear_forward(x, modality_ids, weight, bias):
    check_inputs(x, modality_ids, weight, bias)
    x_rows = x.reshape(-1, x.shape[-1])
    grouping = group_tokens(modality_ids.reshape(-1), weight.shape[0])
    out = _grouped_matmul(x_rows, grouping, weight, weight.stride(2), weight.stride(1), weight.shape[1], bias,
                          torch.result_type(x, weight))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def row_splits(rows: int, n_out: int, n_in: int, modalities: int, device: torch.device) -> int:
    """How many row chunks the dW kernel sums each modality's rows in (split-K over tokens).

    A weight with few output tiles (Mamba's x_proj and dt_proj: 80 x 1536, 1536 x 48)
    would otherwise give a few dozen programs, each looping over every token, on a GPU
    with 100+ SMs. Splits are chosen from shapes alone (no host sync on the counts):
    enough programs for about four per SM, and at least 512 rows per chunk on average.
    """
    if INTERPRET or device.type != "cuda":
        return 1
    tiles = triton.cdiv(n_out, 128) * triton.cdiv(n_in, 128) * modalities
    wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(wanted // tiles, rows // (512 * modalities)))


def routed_linear_backward(grad, x, modality_ids, weight, has_bias: bool, splits: int | None = None,
                           frozen: list[int] | None = None):
    """(dx, dweight, dbias); the `frozen` modalities' weight gradients are zero, their GEMMs skipped (their
    groups count no rows in the weight-gradient kernel)."""
    x_rows = x.reshape(-1, x.shape[-1])
    grad_rows = grad.reshape(-1, weight.shape[1]).contiguous()
    flat_ids = modality_ids.reshape(-1)
    grouping = group_tokens(flat_ids, weight.shape[0])
    modalities, n_out, n_in = weight.shape
    dx = _grouped_matmul(grad_rows, grouping, weight, weight.stride(1), weight.stride(2), n_in, None, x.dtype)
    if splits is None:
        splits = row_splits(x_rows.shape[0], n_out, n_in, modalities, x.device)
    # fp32 partial sums, one [M, out, in] slice per row split. The kernel writes every element (a modality
    # without rows gets zeros), so only a launch that does not happen needs zeroed memory.
    launch = bool(x_rows.shape[0] and n_out and n_in)
    dweight = (torch.empty if launch else torch.zeros)(splits * modalities, n_out, n_in, device=weight.device,
                                                       dtype=torch.float32)
    if launch:
        order, starts, counts = grouping
        if frozen:
            counts = counts.clone()
            counts[list(frozen)] = 0

        def grid(meta):
            return (triton.cdiv(n_out, meta["BLOCK_M"]), triton.cdiv(n_in, meta["BLOCK_N"]), splits * modalities)

        _grouped_weight_grad_kernel[grid](
            grad_rows, x_rows, dweight, order, starts, counts, rows_bucket(x_rows.shape[0]), n_out, n_in, modalities,
            splits, grad_rows.stride(0), grad_rows.stride(1), x_rows.stride(0), x_rows.stride(1),
            dweight.stride(0), dweight.stride(1), dweight.stride(2), IEEE=_full_fp32(x.dtype),
        )
    if splits > 1:
        dweight = dweight.view(splits, modalities, n_out, n_in).sum(0)
    if has_bias:
        dbias = torch.zeros(modalities, n_out, device=grad.device, dtype=torch.float32)
        dbias.index_add_(0, flat_ids, grad_rows.float())
        if frozen:
            dbias[list(frozen)] = 0
        dbias = dbias.to(weight.dtype)
    else:
        dbias = grad.new_zeros((0,), dtype=weight.dtype)
    return dx.reshape(x.shape), dweight.to(weight.dtype), dbias
