"""Recognise a decomposed RMSNorm around a routed scale, so the route pass can emit one fused op.

    mul(w, to(mul(h, rsqrt(add(mean(pow(h, 2), [-1], keepdim=True), eps)))))   (Llama, also w last)
    mul(mul(h, rsqrt(add(mean(pow(h, 2), [-1], keepdim=True), eps))), w)        (cast after the scale)
with h = x or x.to(float32). Anything else falls back to the generic elementwise route.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


@dataclass
class RMSNormMatch:
    normalized: torch.fx.Node   # h: the tensor whose last dim is normalised (already in the compute dtype)
    eps: float


def _strip_cast(node):
    return node.args[0] if isinstance(node, torch.fx.Node) and node.target in CASTS else node


def _is_last_dim(dims) -> bool:
    return list(dims) in ([-1],) or (isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] == -1)


def match_rms_norm(scale_mul: torch.fx.Node, scale_operand: int) -> RMSNormMatch | None:
    """The RMSNorm that `scale_mul` (a mul by the routed scale at args[scale_operand]) completes, if any."""
    normed = _strip_cast(scale_mul.args[1 - scale_operand])
    if not isinstance(normed, torch.fx.Node) or normed.target != aten.mul.Tensor:
        return None
    for h, r in (normed.args, normed.args[::-1]):
        if not isinstance(r, torch.fx.Node) or r.target != aten.rsqrt.default:
            continue
        total = r.args[0]
        if not isinstance(total, torch.fx.Node) or total.target not in (aten.add.Tensor, aten.add.Scalar):
            continue
        mean, eps = total.args
        if isinstance(mean, (int, float)):
            mean, eps = eps, mean
        if not isinstance(mean, torch.fx.Node) or mean.target != aten.mean.dim or not isinstance(eps, (int, float)):
            continue
        if not _is_last_dim(mean.args[1]) or not (len(mean.args) > 2 and mean.args[2]):
            continue
        square = mean.args[0]
        if square.target == aten.pow.Tensor_Scalar and square.args[1] == 2 and square.args[0] is h:
            return RMSNormMatch(normalized=h, eps=float(eps))
        if square.target == aten.mul.Tensor and square.args[0] is h and square.args[1] is h:
            return RMSNormMatch(normalized=h, eps=float(eps))
    return None
