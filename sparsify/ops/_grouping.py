"""Row grouping shared by the torch reference implementations of routed ops."""
from __future__ import annotations

import weakref

import torch

from sparsify.ops.modality_ids import check_id_range


def rows_by_modality(flat_ids: torch.Tensor, modalities: int) -> list[torch.Tensor]:
    """Row indices of each modality, in order; raises if an id falls outside [0, M).

    The range check makes the references total: every row belongs to exactly one
    group, so outputs written group by group never keep uninitialised memory.
    """
    check_id_range(flat_ids, modalities)
    return [(flat_ids == m).nonzero().squeeze(1) for m in range(modalities)]


class ModalityGroups:
    """The rows of each modality as contiguous slices of one stable sort of the ids.

    One bincount (which also range-checks the ids: one host sync) and, unless a single modality holds every
    row, one argsort. An op then gathers its rows once into modality order, runs one GEMM per modality on a
    contiguous slice, and scatters once back, instead of a nonzero / index_select / index_copy per modality.
    """

    def __init__(self, flat_ids: torch.Tensor, modalities: int):
        self.modalities = modalities
        if flat_ids.numel() and int(flat_ids.min()) < 0:
            check_id_range(flat_ids, modalities)  # raises, saying which values
        counts = torch.bincount(flat_ids, minlength=modalities) if flat_ids.numel() else None
        self.counts = [0] * modalities if counts is None else counts.tolist()
        if len(self.counts) > modalities:
            check_id_range(flat_ids, modalities)
        present = [m for m, count in enumerate(self.counts) if count]
        self.single = present[0] if len(present) == 1 else None  # every row has this modality
        self.order = None if self.single is not None or not present else torch.argsort(flat_ids, stable=True)

    def slices(self):
        """(modality, start, stop) of each non-empty group in the sorted rows."""
        start = 0
        for m, count in enumerate(self.counts):
            if count:
                yield m, start, start + count
            start += count

    def to_sorted(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, self.order)

    def from_sorted(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(sorted_rows).index_copy_(0, self.order, sorted_rows)


# Every routed op of a graph takes the same ids tensor (route builds each id layout once), so the groups are
# worked out once per forward, not once per op: memoised by the tensor's identity and version (an in-place
# change bumps the version). Weak references: the memo never keeps ids alive.
_GROUPS: dict[int, tuple] = {}


def groups_of(modality_ids: torch.Tensor, modalities: int) -> ModalityGroups:
    hit = _GROUPS.get(id(modality_ids))
    if hit is not None and hit[0]() is modality_ids and hit[1] == modality_ids._version \
            and hit[2].modalities == modalities:
        return hit[2]
    groups = ModalityGroups(modality_ids.reshape(-1), modalities)
    if len(_GROUPS) > 64:
        for key in [k for k, v in _GROUPS.items() if v[0]() is None]:
            del _GROUPS[key]
    _GROUPS[id(modality_ids)] = (weakref.ref(modality_ids), modality_ids._version, groups)
    return groups


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: reductions never lose precision."""
    return torch.promote_types(dtype, torch.float32)
