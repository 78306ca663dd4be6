"""`sparsify::routed_conv1d`: depthwise causal conv1d whose output position t uses modality(t)'s kernel.

x [B, C, T], modality_ids [B, T], weight [M, C, K], bias [M, C] or None; output [B, C, T]:
    out[b, c, t] = bias[m, c] + sum_k weight[m, c, k] * x[b, c, t - (K - 1) + k],  m = ids[b, t]
(x is zero before t = 0). This is nn.Conv1d(C, C, K, groups=C, padding=K-1)(x)[..., :T]
with the weights of each output token's modality, the conv of every Mamba mixer.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify.ops._grouping import accumulation_dtype, groups_of
from sparsify.ops.backend import use_triton
from sparsify.errors import SparsifyError
from sparsify.ops.spec import RoutedOpSpec, UseKind, register
from sparsify.passes import node_value


def _check(x: Tensor, modality_ids: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != x.shape[1]:
        raise SparsifyError(f"routed_conv1d: x must be [B, C, T] and weight [M, C, K], got {tuple(x.shape)} and "
                            f"{tuple(weight.shape)}")
    if tuple(modality_ids.shape) != (x.shape[0], x.shape[2]):
        raise SparsifyError(f"routed_conv1d: modality_ids must be [B, T] = {(x.shape[0], x.shape[2])}, "
                            f"got {tuple(modality_ids.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise SparsifyError(f"routed_conv1d: bias must be [M, C] = {tuple(weight.shape[:2])}, got {tuple(bias.shape)}")


def _windows(x: Tensor, kernel_size: int) -> Tensor:
    """[B, C, T, K]: the causal window of every output position."""
    return F.pad(x, (kernel_size - 1, 0)).unfold(2, kernel_size, 1)


def routed_conv1d_ref(x: Tensor, modality_ids: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, modality_ids, weight, bias)
    groups_of(modality_ids, weight.shape[0])  # validates the ids, once per ids tensor
    per_token = weight[modality_ids].permute(0, 2, 1, 3)  # [B, C, T, K]
    out = (_windows(x, weight.shape[-1]) * per_token).sum(-1)
    if bias is not None:
        out = out + bias[modality_ids].permute(0, 2, 1)
    return out


def routed_conv1d_backward_ref(grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, has_bias: bool):
    acc = accumulation_dtype(x.dtype)
    modalities, channels, kernel_size = weight.shape
    t = x.shape[2]
    g = grad.to(acc)
    grad_windows = weight[modality_ids].permute(0, 2, 1, 3).to(acc) * g[..., None]  # [B, C, T, K]
    dx = torch.zeros(x.shape, device=x.device, dtype=acc)
    for k in range(kernel_size):  # position t reads x[t - (K - 1) + k]
        shift = kernel_size - 1 - k
        if shift < t:
            dx[:, :, : t - shift] += grad_windows[:, :, shift:, k]
    contrib = (g[..., None] * _windows(x.to(acc), kernel_size)).permute(0, 2, 1, 3).reshape(-1, channels * kernel_size)
    flat_ids = modality_ids.reshape(-1)
    dweight = torch.zeros(modalities, channels * kernel_size, device=x.device, dtype=acc).index_add_(0, flat_ids, contrib)
    dbias = torch.zeros(modalities, channels, device=x.device, dtype=acc).index_add_(
        0, flat_ids, g.permute(0, 2, 1).reshape(-1, channels)) if has_bias else x.new_zeros((0,), dtype=acc)
    return dx.to(x.dtype), dweight.reshape(weight.shape).to(weight.dtype), dbias.to(weight.dtype)


@torch.library.custom_op("sparsify::routed_conv1d", mutates_args=())
def routed_conv1d(x: Tensor, modality_ids: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  backend: str = "auto") -> Tensor:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_conv1d import routed_conv1d_forward

        _check(x, modality_ids, weight, bias)
        return routed_conv1d_forward(x, modality_ids, weight, bias)
    return routed_conv1d_ref(x, modality_ids, weight, bias)


@routed_conv1d.register_fake
def _(x, modality_ids, weight, bias=None, backend="auto"):
    return torch.empty_like(x)


@torch.library.custom_op("sparsify::routed_conv1d_backward", mutates_args=())
def routed_conv1d_backward(grad: Tensor, x: Tensor, modality_ids: Tensor, weight: Tensor, has_bias: bool,
                           backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(backend, x.device):
        from sparsify.kernels.routed_conv1d import routed_conv1d_backward as triton_backward

        return triton_backward(grad, x, modality_ids, weight, has_bias)
    return routed_conv1d_backward_ref(grad, x, modality_ids, weight, has_bias)


@routed_conv1d_backward.register_fake
def _(grad, x, modality_ids, weight, has_bias, backend="auto"):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[:2] if has_bias else (0,))


def _setup_context(ctx, inputs, output):
    x, modality_ids, weight, bias, backend = inputs
    ctx.save_for_backward(x, modality_ids, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad, direct: bool = False):
    """`direct`: call the reference backward itself rather than the backward op (ops/eager.py)."""
    x, modality_ids, weight = ctx.saved_tensors
    backward = routed_conv1d_backward_ref if direct else \
        functools.partial(torch.ops.sparsify.routed_conv1d_backward, backend=ctx.backend)
    dx, dweight, dbias = backward(grad.contiguous(), x, modality_ids, weight, ctx.has_bias)
    return dx, None, dweight, (dbias if ctx.has_bias else None), None


routed_conv1d.register_autograd(_backward, setup_context=_setup_context)


def routed_conv1d_direct(x, modality_ids, weight, bias=None, backend="torch"):
    """The op's signature without its dispatch or autograd (decoding steps, ops/eager.py)."""
    return routed_conv1d_ref(x, modality_ids, weight, bias)


# -- the dense uses it replaces (route) ----------------------------------------------------------------
aten = torch.ops.aten


def _as_int(value):
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


FULL_SLICE_END = 2**63 - 1


def conv1d_trim_chain(conv: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The slices that cut a causal conv's output back to the sequence: full slices of dims 0 and 1
    (what `out[:, :, :T]` exports as) and one slice of the time dim from 0. None if the output is
    used any other way."""
    chain, node, trimmed_time = [], conv, False
    while len(node.users) == 1 and not trimmed_time:
        user = next(iter(node.users))
        if user.target != aten.slice.Tensor or user.args[0] is not node:
            break
        dim, start = user.args[1] if len(user.args) > 1 else 0, user.args[2] if len(user.args) > 2 else None
        end = user.args[3] if len(user.args) > 3 else None
        if start not in (0, None):
            return None
        if dim in (2, -1):
            trimmed_time = True
        elif end not in (None, FULL_SLICE_END):
            return None
        chain.append(user)
        node = user
    return chain if trimmed_time else None


def _classify_conv1d(node: torch.fx.Node, operand: int) -> tuple[str, str | None]:
    """Only the depthwise causal form Mamba mixers use: conv1d(x, w[C,1,K], b, padding=K-1, groups=C)[..., :T]."""
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, _, stride, padding, dilation, groups = args[:7]
    weight_val, x_val = node_value(weight), node_value(x)
    if weight_val is None or x_val is None or x_val.dim() != 3:
        return "unsupported", "conv1d without shape information or not over [batch, channels, time]"
    channels, per_group, kernel = weight_val.shape
    depthwise = per_group == 1 and _as_int(groups) == channels
    causal = _as_int(padding) == kernel - 1 and _as_int(stride or 1) == 1 and _as_int(dilation or 1) == 1
    if not (depthwise and causal and conv1d_trim_chain(node)):
        return "unsupported", ("only a depthwise causal conv1d (groups=channels, padding=kernel-1, output trimmed "
                               "to the sequence) can be routed")
    return ("conv1d_weight" if operand == 1 else "conv1d_bias"), None


def _classify(node, operand: int, param_val):
    if node.target == aten.conv1d.default and operand in (1, 2):
        return _classify_conv1d(node, operand)
    return None


def _rewrite(rw, node, uses, args, stacked):
    """conv1d(x, w, b, padding=K-1, groups=C)[..., :T]  =>  routed_conv1d(x, ids, w[:, :, 0], b)"""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    channels, _, kernel = weight.meta["val"].shape  # dense [C, 1, K]; lifted nodes keep their dense meta
    weight = rw.call(aten.reshape.default, rw.stacked(weight, stacked), [rw.modalities, channels, kernel])
    new = rw.call(torch.ops.sparsify.routed_conv1d.default, x, rw.modality_ids, weight, rw.stacked(bias, stacked))
    chain = conv1d_trim_chain(node)  # the slices back to the sequence length: the routed conv replaces them
    rw.replace(chain[-1], new, meta_from=node)
    for dead in reversed([node] + chain[:-1]):
        rw.graph.erase_node(dead)
    return None


register(RoutedOpSpec(
    op=torch.ops.sparsify.routed_conv1d.default,
    uses=(UseKind("conv1d_weight", "conv", 0, "channels_first", "[M, C, K] stacked", _rewrite),
          UseKind("conv1d_bias", "conv", 0, "channels_first", "[M, C] stacked", _rewrite)),
    classify=_classify, direct=routed_conv1d_direct, autograd=sys.modules[__name__], lowered=True))
