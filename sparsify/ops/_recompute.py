"""Backward by recomputation, for ops whose references are plain differentiable PyTorch (the scans).

A custom op's implementation runs below autograd, so its backward recomputes the
forward from the saved inputs under autograd and takes the vector-Jacobian product.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def save_optional_tensors(ctx, inputs: Sequence) -> None:
    ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs])


def vjp_by_recompute(forward: Callable[..., Tensor | tuple], saved: Sequence[Tensor | None],
                     grad: Tensor | tuple) -> tuple:
    """Gradients of forward(*saved) w.r.t. each saved float tensor (None for absent or non-float ones); for a
    forward with several outputs, `grad` holds one gradient per output."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in saved]
    with torch.enable_grad():
        out = forward(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)
