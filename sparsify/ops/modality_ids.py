"""Validation of the `modality_ids` tensor every routed op and routed model takes."""
from __future__ import annotations

from typing import Sequence

import torch

from sparsify.errors import SparsifyError


def check_modality_ids(modality_ids, token_shape: Sequence[int], modalities: int,
                       check_range: bool = True) -> torch.Tensor:
    """Return `modality_ids` as a LongTensor, or raise SparsifyError (a ValueError) saying what is wrong.

    Out-of-range ids are rejected here, once per forward, so no routed op ever
    indexes a weight copy that does not exist or leaves a token uncomputed.
    `check_range=False` skips that check and its host sync (type and shape are
    still checked).
    """
    if not isinstance(modality_ids, torch.Tensor):
        raise SparsifyError(
            f"modality_ids must be a torch.LongTensor of shape {tuple(token_shape)} (batch, seq), "
            f"got {type(modality_ids).__name__}."
        )
    if modality_ids.dtype.is_floating_point or modality_ids.dtype.is_complex or modality_ids.dtype == torch.bool:
        raise SparsifyError(
            f"modality_ids must hold integer modality indices (torch.long), got dtype {modality_ids.dtype}; "
            f"convert with ids.long() if the values are whole numbers in [0, {modalities})."
        )
    if tuple(modality_ids.shape) != tuple(token_shape):
        raise SparsifyError(
            f"modality_ids has shape {tuple(modality_ids.shape)} but the tokens have shape {tuple(token_shape)}: "
            "pass one modality id per token, shaped like the leading (batch, seq) dims of the model's first input."
        )
    if check_range:
        check_id_range(modality_ids, modalities)
    return modality_ids.long()


def check_id_range(modality_ids: torch.Tensor, modalities: int) -> None:
    """Raise SparsifyError unless every id lies in [0, modalities). One host sync."""
    if modality_ids.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(modality_ids))
        if low < 0 or high >= modalities:
            raise SparsifyError(
                f"modality_ids must lie in [0, {modalities}) for a model routed over {modalities} modalities, "
                f"got values in [{low}, {high}]."
            )
