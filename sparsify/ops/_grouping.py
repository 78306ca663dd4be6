"""Row grouping shared by the torch reference implementations of routed ops."""
from __future__ import annotations

import torch


def rows_by_modality(flat_ids: torch.Tensor, modalities: int) -> list[torch.Tensor]:
    """Row indices of each modality, in order; raises if an id falls outside [0, M).

    The range check makes the references total: every row belongs to exactly one
    group, so outputs written group by group never keep uninitialised memory.
    """
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= modalities):
        raise ValueError(
            f"modality ids must lie in [0, {modalities}), got values in "
            f"[{int(flat_ids.min())}, {int(flat_ids.max())}]."
        )
    return [(flat_ids == m).nonzero().squeeze(1) for m in range(modalities)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: reductions never lose precision."""
    return torch.promote_types(dtype, torch.float32)
