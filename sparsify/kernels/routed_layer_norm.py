"""Triton routed layer norm and RMS norm: per-token weight/bias picked by modality, fp32 statistics.

One kernel serves both norms (IS_RMS drops the mean), as the two differ only there.
Forward: one program per row. Backward: each program owns a block of rows,
recomputes each row's statistics (cheaper than storing them), writes dx, and accumulates its rows' dweight/dbias into its own [M, D] slice of a
partial buffer (no atomics, deterministic); the slices are summed at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.errors import SparsifyError
from sparsify.kernels import INTERPRET


@triton.jit
def _norm_forward_kernel(
    x_ptr, ids_ptr, w_ptr, b_ptr, y_ptr,
    D, stride_x, stride_y, stride_w, stride_b, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        mean = 0.0
        centered = x
    else:
        mean = tl.sum(x, axis=0) / D
        centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    y = centered * rstd
    modality = tl.load(ids_ptr + row)
    if HAS_W:
        y = y * tl.load(w_ptr + modality * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + modality * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    x_ptr, ids_ptr, w_ptr, grad_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    N, D, M, ROWS_PER_PROGRAM, stride_x, stride_g, stride_dx, stride_w, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ROWS_PER_PROGRAM is a runtime value: as a constexpr every new token count would compile anew.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    for i in range(0, ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        if row < N:
            row64 = row.to(tl.int64)
            x = tl.load(x_ptr + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(grad_ptr + row64 * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                centered = x
            else:
                centered = tl.where(mask, x - tl.sum(x, axis=0) / D, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
            xhat = centered * rstd
            modality = tl.load(ids_ptr + row)
            if HAS_W:
                grad_xhat = grad * tl.load(w_ptr + modality * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                grad_xhat = grad
            dx = grad_xhat - xhat * (tl.sum(grad_xhat * xhat, axis=0) / D)
            if not IS_RMS:
                dx = dx - tl.sum(grad_xhat, axis=0) / D
            tl.store(dx_ptr + row64 * stride_dx + cols, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
            slice_offset = (pid * M + modality).to(tl.int64) * D + cols
            if HAS_W:
                tl.store(dw_part_ptr + slice_offset, tl.load(dw_part_ptr + slice_offset, mask=mask) + grad * xhat,
                         mask=mask)
            if HAS_B:
                tl.store(db_part_ptr + slice_offset, tl.load(db_part_ptr + slice_offset, mask=mask) + grad,
                         mask=mask)


def _num_warps(block_d: int) -> int:
    """Warps per row program: wide rows get more threads, so each keeps few elements in registers."""
    return 4 if block_d <= 2048 else 8 if block_d <= 8192 else 16


def _rows(x: torch.Tensor, modality_ids: torch.Tensor, stacked: torch.Tensor, op: str):
    d = x.shape[-1]
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise SparsifyError(f"{op}: modality_ids must have shape {tuple(x.shape[:-1])}, "
                            f"got {tuple(modality_ids.shape)}")
    if stacked.dim() != 2 or stacked.shape[1] != d:
        raise SparsifyError(f"{op}: weight/bias must be [M, {d}], got {tuple(stacked.shape)}")
    return x.reshape(-1, d).contiguous(), modality_ids.reshape(-1).contiguous()


def norm_forward(x, modality_ids, weight, bias, eps: float, is_rms: bool):
    op = "routed_rms_norm" if is_rms else "routed_layer_norm"
    stacked = weight if weight is not None else bias
    x_rows, ids = _rows(x, modality_ids, stacked, op)
    n, d = x_rows.shape
    out_dtype = torch.result_type(x, weight) if (is_rms and weight is not None) else x.dtype
    y = torch.empty(n, d, device=x.device, dtype=out_dtype)
    if n:
        _norm_forward_kernel[(n,)](
            x_rows, ids, weight if weight is not None else x_rows, bias if bias is not None else x_rows, y,
            d, x_rows.stride(0), y.stride(0), weight.stride(0) if weight is not None else 0,
            bias.stride(0) if bias is not None else 0, eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_D=triton.next_power_of_2(d),
            num_warps=_num_warps(triton.next_power_of_2(d)),
        )
    return y.reshape(*x.shape[:-1], d)


def norm_backward(grad, x, modality_ids, weight, modalities: int, eps: float, has_bias: bool, is_rms: bool):
    d = x.shape[-1]
    x_rows = x.reshape(-1, d).contiguous()
    grad_rows = grad.reshape(-1, d).contiguous()
    ids = modality_ids.reshape(-1).contiguous()
    n = x_rows.shape[0]
    dx = torch.empty_like(x_rows)
    if torch.cuda.is_available() and x.is_cuda and not INTERPRET:
        programs = min(n, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        programs = min(n, 8)
    rows_per_program = triton.cdiv(n, max(programs, 1)) if n else 1
    programs = triton.cdiv(n, rows_per_program) if n else 0
    dw_part = torch.zeros(programs if weight is not None else 0, modalities, d, device=x.device, dtype=torch.float32)
    db_part = torch.zeros(programs if has_bias else 0, modalities, d, device=x.device, dtype=torch.float32)
    if n:
        _norm_backward_kernel[(programs,)](
            x_rows, ids, weight if weight is not None else x_rows, grad_rows, dx,
            dw_part if weight is not None else x_rows, db_part if has_bias else x_rows,
            n, d, modalities, rows_per_program, x_rows.stride(0), grad_rows.stride(0), dx.stride(0),
            weight.stride(0) if weight is not None else 0, eps,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=has_bias, BLOCK_D=triton.next_power_of_2(d),
            num_warps=_num_warps(triton.next_power_of_2(d)),
        )
    param_dtype = weight.dtype if weight is not None else x.dtype
    dweight = dw_part.sum(0).to(param_dtype) if weight is not None else x.new_zeros((0,), dtype=param_dtype)
    dbias = db_part.sum(0).to(param_dtype) if has_bias else x.new_zeros((0,), dtype=param_dtype)
    return dx.reshape(x.shape), dweight, dbias
