"""Routed ops: the functional API over the `torch.ops.sparsify.*` custom ops.

Each takes `modality_ids` shaped like the input's token dims and stacked
parameters with a leading modality dim M. `backend` is "auto" (Triton on CUDA,
the torch reference elsewhere), "torch" or "triton" (on CPU the kernels then run
under TRITON_INTERPRET=1). These functions check modality_ids (dtype, shape,
range: one host sync); the graph ops a routed model runs skip that, as the model
checks the ids once per forward.
"""
from __future__ import annotations

import torch

from sparsify.errors import SparsifyError
# Importing an op module registers its custom op and its spec (ops/spec.py). The order is the order in which
# the specs claim a parameter's use: routed_gather, which takes any elementwise use, after the norms (whose
# scale is an elementwise multiply) and every other op.
from sparsify.ops import selective_scan as _selective_scan_op  # noqa: F401  (not routed: opaque scans)
from sparsify.ops import ssd_scan as _ssd_scan_op  # noqa: F401
from sparsify.ops import permute_rows as _permute_rows_op  # noqa: F401
from sparsify.ops import routed_linear as _linear_op  # noqa: F401
from sparsify.ops import routed_rms_norm as _rms_norm_op  # noqa: F401
from sparsify.ops import routed_layer_norm as _layer_norm_op  # noqa: F401
from sparsify.ops import routed_conv1d as _conv1d_op  # noqa: F401
from sparsify.ops import routed_embedding as _embedding_op  # noqa: F401
from sparsify.ops import routed_gather as _gather_op  # noqa: F401
from sparsify.ops._grouping import release_scratch_buffers
from sparsify.ops.backend import BACKENDS
from sparsify.ops.modality_ids import check_modality_ids

__all__ = ["BACKENDS", "check_modality_ids", "release_scratch_buffers", "routed_conv1d", "routed_embedding",
           "routed_gather", "routed_layer_norm", "routed_linear", "routed_rms_norm"]


def _ids(modality_ids, x, modalities):
    return check_modality_ids(modality_ids, x.shape[:-1], modalities)


def routed_linear(x, modality_ids, weight, bias=None, *, backend="auto"):
    """y[t] = x[t] @ weight[ids[t]].T + bias[ids[t]]; x [..., in], weight [M, out, in], bias [M, out]."""
    return torch.ops.sparsify.routed_linear(x, _ids(modality_ids, x, weight.shape[0]), weight, bias, backend)


def routed_layer_norm(x, modality_ids, weight, bias, eps=1e-5, *, backend="auto"):
    """Layer norm over the last dim with weight [M, D] and bias [M, D] (either may be None)."""
    stacked = weight if weight is not None else bias
    if stacked is None:
        raise SparsifyError("routed_layer_norm needs a stacked weight or bias; "
                            "use F.layer_norm when neither is routed")
    return torch.ops.sparsify.routed_layer_norm(x, _ids(modality_ids, x, stacked.shape[0]), weight, bias, eps,
                                                backend)


def routed_rms_norm(x, modality_ids, weight, eps=1e-6, *, backend="auto"):
    """RMS norm over the last dim with scale weight [M, D]; statistics in fp32."""
    return torch.ops.sparsify.routed_rms_norm(x, _ids(modality_ids, x, weight.shape[0]), weight, eps, backend)


def routed_gather(weight, modality_ids):
    """weight[ids]: the per-token copy of a stacked parameter [M, *S], shaped [*ids.shape, *S]."""
    shape = modality_ids.shape if isinstance(modality_ids, torch.Tensor) else ()
    return torch.ops.sparsify.routed_gather(weight, check_modality_ids(modality_ids, shape, weight.shape[0]))


def routed_embedding(indices, modality_ids, weight, padding_idx=None):
    """weight[ids[t], indices[t]]: the embedding table of each token's modality; weight [M, V, D]."""
    ids = check_modality_ids(modality_ids, tuple(indices.shape), weight.shape[0])
    return torch.ops.sparsify.routed_embedding(indices, ids, weight, -1 if padding_idx is None else padding_idx)


def routed_conv1d(x, modality_ids, weight, bias=None, *, backend="auto"):
    """Depthwise causal conv1d, x [B, C, T], ids [B, T], weight [M, C, K]: position t uses modality(t)'s kernel."""
    if x.dim() != 3:
        raise SparsifyError(f"routed_conv1d: x must be [B, C, T], got {tuple(x.shape)}")
    ids = check_modality_ids(modality_ids, (x.shape[0], x.shape[2]), weight.shape[0])
    return torch.ops.sparsify.routed_conv1d(x, ids, weight, bias, backend)
