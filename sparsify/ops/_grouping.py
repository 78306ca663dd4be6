"""Row grouping shared by the torch reference implementations of routed ops."""
from __future__ import annotations

import torch

from sparsify.ops.modality_ids import check_id_range


def rows_by_modality(flat_ids: torch.Tensor, modalities: int) -> list[torch.Tensor]:
    """Row indices of each modality, in order; raises if an id falls outside [0, M).

    The range check makes the references total: every row belongs to exactly one
    group, so outputs written group by group never keep uninitialised memory.
    """
    check_id_range(flat_ids, modalities)
    return [(flat_ids == m).nonzero().squeeze(1) for m in range(modalities)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: reductions never lose precision."""
    return torch.promote_types(dtype, torch.float32)
