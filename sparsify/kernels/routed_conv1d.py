"""Triton routed depthwise causal conv1d: output position t uses modality(t)'s kernel and bias.

Programs tile (batch, channel block, time block). The weight of each output
position is gathered by its modality id while loading. dweight/dbias are
reduced per modality inside each tile and added with fp32 atomics (their order,
and so the last bits of the sums, may vary run to run on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels import INTERPRET

BLOCK_C, BLOCK_T = (16, 16) if INTERPRET else (32, 128)
NUM_WARPS = 8


@triton.jit
def _tile(ids_ptr, C, T, stride_ib, stride_it, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's (batch, channel block, time block) tile, its masks and the modality of each position."""
    b = tl.program_id(0).to(tl.int64)
    # int64 channel offsets: channel * stride (= C * T per sequence) can pass 2**31 on long sequences
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_ok, t_ok = offs_c < C, offs_t < T
    ids = tl.load(ids_ptr + b * stride_ib + offs_t * stride_it, mask=t_ok, other=0)
    return b, offs_c, offs_t, c_ok, c_ok[:, None] & t_ok[None, :], ids


@triton.jit
def _conv_forward_kernel(
    x_ptr, ids_ptr, w_ptr, b_ptr, out_ptr, C, T, K,
    stride_xb, stride_xc, stride_xt, stride_ib, stride_it, stride_wm, stride_wc, stride_wk, stride_bm,
    stride_ob, stride_oc, stride_ot,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b, offs_c, offs_t, c_ok, ok, ids = _tile(ids_ptr, C, T, stride_ib, stride_it, BLOCK_C, BLOCK_T)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(0, K):
        src = offs_t - (K - 1) + k
        x = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + src[None, :] * stride_xt,
                    mask=ok & (src >= 0)[None, :], other=0.0)
        w = tl.load(w_ptr + ids[None, :] * stride_wm + offs_c[:, None] * stride_wc + k * stride_wk, mask=ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids[None, :] * stride_bm + offs_c[:, None], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + offs_c[:, None] * stride_oc + offs_t[None, :] * stride_ot,
             acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_backward_kernel(
    grad_ptr, x_ptr, ids_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, C, T, K, M,
    stride_gb, stride_gc, stride_gt, stride_xb, stride_xc, stride_xt, stride_ib, stride_it,
    stride_wm, stride_wc, stride_wk,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b, offs_c, offs_t, c_ok, ok, ids = _tile(ids_ptr, C, T, stride_ib, stride_it, BLOCK_C, BLOCK_T)
    grad = tl.load(grad_ptr + b * stride_gb + offs_c[:, None] * stride_gc + offs_t[None, :] * stride_gt,
                   mask=ok, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(0, K):
        # dx[s] gathers the outputs t = s + (K - 1 - k) that read x[s] through tap k.
        dst = offs_t + (K - 1 - k)
        dst_ok = ok & (dst < T)[None, :]
        dst_ids = tl.load(ids_ptr + b * stride_ib + dst * stride_it, mask=dst < T, other=0)
        g = tl.load(grad_ptr + b * stride_gb + offs_c[:, None] * stride_gc + dst[None, :] * stride_gt,
                    mask=dst_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + dst_ids[None, :] * stride_wm + offs_c[:, None] * stride_wc + k * stride_wk,
                    mask=dst_ok, other=0.0).to(tl.float32)
        dx += g * w
        # dweight[m, c, k] sums grad[t] * x[t - (K - 1) + k] over this tile's outputs of modality m.
        src = offs_t - (K - 1) + k
        x = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + src[None, :] * stride_xt,
                    mask=ok & (src >= 0)[None, :], other=0.0).to(tl.float32)
        contrib = grad * x
        for m in range(0, M):
            part = tl.sum(tl.where((ids == m)[None, :], contrib, 0.0), axis=1)
            tl.atomic_add(dw_ptr + (m * C + offs_c) * K + k, part, mask=c_ok)
    tl.store(dx_ptr + b * stride_xb + offs_c[:, None] * stride_xc + offs_t[None, :] * stride_xt,
             dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        for m in range(0, M):
            part = tl.sum(tl.where((ids == m)[None, :], grad, 0.0), axis=1)
            tl.atomic_add(db_ptr + m * C + offs_c, part, mask=c_ok)


def _grid(x):
    batch, channels, length = x.shape
    return (batch, triton.cdiv(channels, BLOCK_C), triton.cdiv(length, BLOCK_T))


def routed_conv1d_forward(x, modality_ids, weight, bias):
    out = torch.empty_like(x)
    if x.numel():
        _conv_forward_kernel[_grid(x)](
            x, modality_ids, weight, bias if bias is not None else weight, out, x.shape[1], x.shape[2], weight.shape[2],
            *x.stride(), *modality_ids.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *out.stride(), HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS,
        )
    return out


def routed_conv1d_backward(grad, x, modality_ids, weight, has_bias: bool):
    modalities, channels, kernel_size = weight.shape
    dx = torch.empty_like(x)
    dweight = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(modalities, channels, device=x.device, dtype=torch.float32)
    if x.numel():
        _conv_backward_kernel[_grid(x)](
            grad, x, modality_ids, weight, dx, dweight, dbias, channels, x.shape[2], kernel_size, modalities,
            *grad.stride(), *x.stride(), *modality_ids.stride(), *weight.stride(),
            HAS_BIAS=has_bias, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS,
        )
    return dx, dweight.to(weight.dtype), (dbias.to(weight.dtype) if has_bias else x.new_zeros((0,), dtype=weight.dtype))
