"""Row grouping shared by the torch reference implementations of routed ops."""
from __future__ import annotations

import functools
import weakref

import torch

from sparsify.ops.modality_ids import check_id_range


class ModalityGroups:
    """The rows of each modality as contiguous slices of one stable sort of the ids.

    One bincount (one host sync; it also range-checks the ids) and, unless a single modality holds every
    row, one argsort. A reference then puts its rows in modality order once (`to_sorted`), computes each
    modality on a contiguous slice (one GEMM per modality for a linear), and puts them back once
    (`from_sorted`), instead of a nonzero / index_select / index_copy per modality. With one modality the
    sort and both copies are skipped. Every row belongs to exactly one slice, so outputs written slice by
    slice never keep uninitialised memory.
    """

    def __init__(self, modality_ids: torch.Tensor, modalities: int):
        self.modalities = modalities
        flat_ids = modality_ids.reshape(-1)
        try:
            self.counts = torch.bincount(flat_ids, minlength=modalities).tolist()
        except RuntimeError:  # bincount refuses negative values: say which, as every range check does
            check_id_range(flat_ids, modalities)
            raise
        if len(self.counts) > modalities:
            check_id_range(flat_ids, modalities)  # raises, naming the values
        present = [m for m, count in enumerate(self.counts) if count]
        self.single = present[0] if len(present) == 1 else None  # every row has this modality
        # A weak reference: the groups are memoised (groups_of) and must not keep the ids alive.
        self._ids = weakref.ref(modality_ids)

    @functools.cached_property
    def order(self) -> torch.Tensor | None:
        """Row indices in modality order (None when one modality holds every row, or when the rows are in
        modality order already, as in a region the hoist pass sorted); sorted on first use, so an op that
        only needs the ids validated (a gather) pays no sort."""
        if self.single is not None:
            return None
        flat = self._ids().reshape(-1)
        if bool((flat[1:] >= flat[:-1]).all()):  # one pass over the ids, once per forward (memoised)
            return None
        return torch.argsort(flat, stable=True)

    def slices(self):
        """(modality, start, stop) of each non-empty group in the sorted rows."""
        start = 0
        for m, count in enumerate(self.counts):
            if count:
                yield m, start, start + count
            start += count

    def to_sorted(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.order is None else rows.index_select(0, self.order)

    def from_sorted(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        return sorted_rows if self.order is None else torch.empty_like(sorted_rows).index_copy_(0, self.order,
                                                                                               sorted_rows)


# Every routed op of a graph takes the same ids tensor (route builds each id layout once), so the groups are
# worked out once per forward, not once per op: memoised by the tensor's identity and version (an in-place
# change bumps the version). Weak references: the memo never keeps ids alive.
_GROUPS: dict[int, tuple] = {}


def groups_of(modality_ids: torch.Tensor, modalities: int) -> ModalityGroups:
    """The groups of these ids (validated: a SparsifyError for an id outside [0, modalities)), worked out
    once per ids tensor."""
    hit = _GROUPS.get(id(modality_ids))
    if hit is not None and hit[0]() is modality_ids and hit[1] == modality_ids._version \
            and hit[2].modalities == modalities:
        return hit[2]
    groups = ModalityGroups(modality_ids, modalities)
    if len(_GROUPS) > 64:
        for key in [k for k, v in _GROUPS.items() if v[0]() is None]:
            del _GROUPS[key]
    _GROUPS[id(modality_ids)] = (weakref.ref(modality_ids), modality_ids._version, groups)
    return groups


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: reductions never lose precision."""
    return torch.promote_types(dtype, torch.float32)
