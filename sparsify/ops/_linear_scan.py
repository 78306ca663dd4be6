"""The first-order linear recurrence under both CPU scans: h_t = a_t * h_{t-1} + x_t, h_{-1} = 0.

A Python loop over time pays its per-step overhead L times, and a closed form within a chunk
(exp(S_t - S_s) for every pair, as SSD's matrix form) costs Q times the work when the decay differs per
state (Mamba1's A is [d, n]). This is a two-level scan instead, stable and O(L) in work:

    1. time split into C chunks of Q ~ sqrt(L) steps; the recurrence runs within every chunk at once
       (Q steps over [C, ...] slices), each chunk starting from zero
    2. a short recurrence over the C chunk ends carries the true state into each chunk
    3. h = local h + (product of a since the chunk start) * carried state   (a cumulative product:
       no division, so no overflow where decays underflow to zero)

so about 2 sqrt(L) Python steps instead of L, each over C or 1/Q of the data.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_scan(a: Tensor, x: Tensor, chunk: int | None = None) -> Tensor:
    """Every h_t, time on dim 0. `a` broadcasts against `x` (same number of dims, size 1 where shared)."""
    length = x.shape[0]
    if length == 0:
        return x.clone()
    q = chunk or max(1, math.isqrt(length))
    chunks = -(-length // q)
    pad = chunks * q - length
    if pad:  # padded steps (a = 1, x = 0) come after the end and are dropped
        a = torch.cat([a, a.new_ones((pad, *a.shape[1:]))])
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    a = a.reshape(chunks, q, *a.shape[1:])
    x = x.reshape(chunks, q, *x.shape[1:])
    h = torch.empty(torch.broadcast_shapes(a.shape, x.shape), dtype=x.dtype, device=x.device)
    h[:, 0] = x[:, 0]
    for j in range(1, q):  # 1: within every chunk at once
        torch.addcmul(x[:, j], a[:, j], h[:, j - 1], out=h[:, j])
    decay = torch.cumprod(a, dim=1)  # product of a from the chunk's start through each step
    carried = torch.zeros_like(h[:, 0])
    for c in range(1, chunks):  # 2: the true state at the end of chunk c-1, into chunk c
        torch.addcmul(h[c - 1, q - 1], decay[c - 1, q - 1], carried[c - 1], out=carried[c])
    h.addcmul_(decay, carried[:, None])  # 3
    return h.reshape(chunks * q, *h.shape[2:])[:length]
