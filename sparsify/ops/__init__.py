"""Routed custom ops (`torch.ops.sparsify.*`): schema, fake impl, torch reference, autograd.

Importing this package registers the ops. Each takes `modality_ids` shaped like
the input's token dims and stacked parameters with a leading modality dim M.
"""
from sparsify.ops.modality_ids import check_modality_ids
from sparsify.ops.routed_gather import routed_gather
from sparsify.ops.routed_layer_norm import routed_layer_norm
from sparsify.ops.routed_linear import routed_linear

__all__ = ["check_modality_ids", "routed_gather", "routed_layer_norm", "routed_linear"]
