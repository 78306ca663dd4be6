"""Row grouping shared by the torch reference implementations of routed ops."""
from __future__ import annotations

import functools
import math
import threading
import weakref

import torch

from sparsify.ops.modality_ids import check_id_range


# A modality's rows are computed in place, without sorting, when the ids form runs this long on average: spans
# of text and image tokens as multi-modal sequences hold them, or rows the hoist pass already sorted. Each run is
# then one GEMM on views of the rows as they are. Below this a GEMM per run costs more than one sort and unsort.
MIN_ROWS_PER_RUN = 64


class ModalityGroups:
    """The rows of each modality as contiguous slices: runs of equal ids in place, or one stable sort.

    One bincount (one host sync; it also range-checks the ids). If one modality holds every row, nothing
    more. If the ids form a few long runs (MIN_ROWS_PER_RUN), each run is a slice of the rows as they are:
    no copy at all. Otherwise one argsort: a reference puts its rows in modality order once (`to_sorted`),
    computes each modality on a contiguous slice (one GEMM per modality for a linear) and puts them back
    once (`from_sorted`), instead of a nonzero / index_select / index_copy per modality. Every row belongs to
    exactly one slice, so outputs written slice by slice never keep uninitialised memory; a modality may own
    several slices, so per-modality reductions (weight gradients) accumulate over them.
    """

    def __init__(self, modality_ids: torch.Tensor, modalities: int, single: int | None = None):
        self.modalities = modalities
        # A weak reference: the groups are memoised (groups_of) and must not keep the ids alive.
        self._ids = weakref.ref(modality_ids)
        if single is not None:  # known already (groups_of: a view of ids one modality fills): no bincount
            self.counts = [0] * modalities
            self.counts[single] = modality_ids.numel()
            self.single, self.present = single, [single]
            return
        flat_ids = modality_ids.reshape(-1)
        try:
            self.counts = torch.bincount(flat_ids, minlength=modalities).tolist()
        except RuntimeError:  # bincount refuses negative values: say which, as every range check does
            check_id_range(flat_ids, modalities)
            raise
        if len(self.counts) > modalities:
            check_id_range(flat_ids, modalities)  # raises, naming the values
        self.present = [m for m, count in enumerate(self.counts) if count]  # the modalities of the rows, in order
        self.single = self.present[0] if len(self.present) == 1 else None  # every row has this modality

    @functools.cached_property
    def runs(self) -> list[tuple[int, int, int]] | None:
        """(modality, start, stop) of each maximal run of equal ids in row order, when they average at least
        MIN_ROWS_PER_RUN rows or each modality is one run (rows in modality order already); else None."""
        rows = sum(self.counts)
        if self.single is not None:
            return [(self.single, 0, rows)]
        flat = self._ids().reshape(-1)
        changes = flat[1:] != flat[:-1]
        count = int(changes.sum()) + 1  # one host sync, once per forward (memoised)
        grouped = count == len(self.present)  # each modality one run: rows already in order
        if not grouped and count * MIN_ROWS_PER_RUN > rows:
            return None
        starts = [0] + (changes.nonzero().reshape(-1) + 1).tolist()
        modality = flat[starts].tolist()
        return [(m, start, stop) for m, start, stop in zip(modality, starts, starts[1:] + [rows])]

    @functools.cached_property
    def present_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(each row's position among the present modalities, each row's index): for an op that computes every
        present modality on all rows and keeps each row's own (a few rows)."""
        ids = self._ids().reshape(-1)
        slot = torch.full((self.modalities,), -1, dtype=torch.long, device=ids.device)
        slot[self.present] = torch.arange(len(self.present), device=ids.device)
        return slot[ids], torch.arange(ids.numel(), device=ids.device)

    @functools.cached_property
    def order(self) -> torch.Tensor | None:
        """Row indices in modality order; None when the rows are computed in place (`runs`). Sorted on
        first use, so an op that only needs the ids validated (a gather) pays no sort."""
        if self.runs is not None:
            return None
        return torch.argsort(self._ids().reshape(-1), stable=True)

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """Where each row went in `order`: putting rows back is then a gather (parallel in ATen), not a
        scatter."""
        order = self.order
        return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))

    def slices(self):
        """(modality, start, stop) of each slice of the rows `to_sorted` gives: the runs, or the modality
        groups of the sort."""
        if self.runs is not None:
            yield from self.runs
            return
        start = 0
        for m, count in enumerate(self.counts):
            if count:
                yield m, start, start + count
            start += count

    @functools.cached_property
    def split(self) -> tuple[list[int], list[int]]:
        """(modality of each slice, row count of each slice): `rows.split_with_sizes(sizes)` gives every slice's
        view in one call (the C method: Tensor.split is a Python wrapper). A per-slice `rows[start:stop]` costs
        an indexing call each, a measurable part of a routed op at a small model's ~340 rows per GEMM."""
        plan = list(self.slices())
        return [m for m, _, _ in plan], [stop - start for _, start, stop in plan]

    def to_sorted(self, rows: torch.Tensor, scratch: str | None = None) -> torch.Tensor:
        """The rows in slice order; into the named scratch buffer (scratch_buffer) when given, so the caller
        must be done with the result before it asks for that buffer again."""
        if self.order is None:
            return rows
        out = None if scratch is None else scratch_buffer(scratch, rows.shape, rows.dtype, rows.device)
        return torch.index_select(rows, 0, self.order, out=out)

    def from_sorted(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """A new tensor holding sorted_rows back in row order."""
        return sorted_rows if self.order is None else sorted_rows.index_select(0, self.inverse)


# Why scratch buffers: glibc hands out every allocation above 32 MiB as fresh mmap pages, which the kernel zeroes
# on first touch. For the sorted copies of a large linear's rows (8192 x 2816 fp32 is 92 MiB) that page
# faulting costs more than the copy itself, so the CPU references keep one buffer per role per thread and
# reuse it across calls. Only intermediates live there, never an op's output. The memory stays held: at most
# SCRATCH_MAX_BYTES per role (six roles), larger ones are allocated per call; release_scratch_buffers() frees
# them. Other devices have caching allocators: there a scratch buffer is a plain allocation.
SCRATCH_MAX_BYTES = 128 * 2**20
_SCRATCH = threading.local()


def scratch_buffer(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of this shape that stays allocated for the next caller of `name` (CPU)."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel * dtype.itemsize > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    held = buffers.get((name, dtype))
    if held is None or held.numel() < numel:
        buffers[(name, dtype)] = held = torch.empty(numel, dtype=dtype)
    return held[:numel].view(shape)


def release_scratch_buffers() -> None:
    """Free this thread's scratch buffers (they are allocated again on the next routed op that needs them)."""
    _SCRATCH.__dict__.pop("buffers", None)


# Every routed op of a graph takes the same ids tensor (route builds each id layout once), so the groups are
# worked out once per forward, not once per op: memoised by the tensor's identity and version (an in-place
# change bumps the version). Weak references: the memo never keeps ids alive.
_GROUPS: dict[int, tuple] = {}


def _memoised(modality_ids: torch.Tensor, modalities: int) -> ModalityGroups | None:
    hit = _GROUPS.get(id(modality_ids))
    if hit is not None and hit[0]() is modality_ids and hit[1] == modality_ids._version \
            and hit[2].modalities == modalities:
        return hit[2]
    return None


def groups_of(modality_ids: torch.Tensor, modalities: int) -> ModalityGroups:
    """The groups of these ids (validated: a SparsifyError for an id outside [0, modalities)), worked out
    once per ids tensor. A view of ids whose groups are known and hold one modality (a decoding step's
    per-op id layouts: select / unsqueeze / expand of the step's ids) holds that modality too: no bincount
    and no host sync per op."""
    hit = _memoised(modality_ids, modalities)
    if hit is not None:
        return hit
    base = _memoised(modality_ids._base, modalities) if modality_ids._base is not None else None
    single = base.single if base is not None and modality_ids.numel() else None
    groups = ModalityGroups(modality_ids, modalities, single)
    if len(_GROUPS) > 64:
        for key in [k for k, v in _GROUPS.items() if v[0]() is None]:
            del _GROUPS[key]
    _GROUPS[id(modality_ids)] = (weakref.ref(modality_ids), modality_ids._version, groups)
    return groups


def owned(modality_ids: torch.Tensor) -> torch.Tensor:
    """Ids as a routed graph takes them: a tensor of their own (a copy of a view). The graph's per-op layouts
    of them (select / unsqueeze / expand) are then views whose root is these ids, so groups_of derives their
    groups from these ids' memoised ones instead of counting each layout: a decoding step of a Mamba gave
    every routed op its own layout of a slice of the generation history."""
    if torch.compiler.is_compiling() or modality_ids._base is None:
        return modality_ids
    return modality_ids.clone()


def per_token(stacked: torch.Tensor, modality_ids: torch.Tensor, groups: ModalityGroups, dtype: torch.dtype,
              scratch: str | None = None) -> torch.Tensor:
    """Each token's row of a stacked [M, D] parameter, as [tokens, D] (a broadcast [D] row when one modality
    holds every token): for an elementwise op one gather is cheaper than sorting rows into groups and back.
    Gathered into the named scratch buffer when given (see scratch_buffer)."""
    if groups.single is not None:
        return stacked[groups.single].to(dtype)
    flat_ids = modality_ids.reshape(-1)
    out = None if scratch is None else \
        scratch_buffer(scratch, (flat_ids.numel(), stacked.shape[-1]), dtype, stacked.device)
    return torch.index_select(stacked.to(dtype), 0, flat_ids, out=out)


def affine_per_token_(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      modality_ids: torch.Tensor, groups: ModalityGroups) -> torch.Tensor:
    """rows [tokens, D] = rows * weight[ids] + bias[ids] in place (either may be None), for stacked [M, D]
    parameters. Rows in runs of one modality (a hoisted region, spans): each run scaled by its modality's row,
    nothing gathered; otherwise the scales, then the shifts, gathered per token into one reused buffer (one
    addcmul with both gathered at once measured no faster and would hold a second buffer)."""
    if groups.runs is not None:
        for m, start, stop in groups.slices():
            if weight is not None:
                rows[start:stop].mul_(weight[m].to(rows.dtype))
            if bias is not None:
                rows[start:stop].add_(bias[m].to(rows.dtype))
        return rows
    if weight is not None:
        rows.mul_(per_token(weight, modality_ids, groups, rows.dtype, "norm_gathered"))
    if bias is not None:
        rows.add_(per_token(bias, modality_ids, groups, rows.dtype, "norm_gathered"))
    return rows


def times_per_token(rows: torch.Tensor, stacked: torch.Tensor, modality_ids: torch.Tensor, groups: ModalityGroups,
                    scratch: str) -> torch.Tensor:
    """rows [tokens, D] times each token's row of stacked [M, D], in the named scratch buffer: per run of one
    modality where the rows come in runs (nothing gathered), else by a per-token gather."""
    if groups.runs is not None:
        out = scratch_buffer(scratch, rows.shape, rows.dtype, rows.device)
        modalities, sizes = groups.split
        for m, rows_slice, out_slice in zip(modalities, rows.split_with_sizes(sizes), out.split_with_sizes(sizes)):
            torch.mul(rows_slice, stacked[m].to(rows.dtype), out=out_slice)
        return out
    return per_token(stacked, modality_ids, groups, rows.dtype, scratch).mul_(rows)


def per_modality_sum(rows: torch.Tensor, modality_ids: torch.Tensor, groups: ModalityGroups) -> torch.Tensor:
    """[M, D]: the sum of each modality's rows of `rows` [tokens, D] (the weight gradient of an elementwise
    per-token parameter): one sum per run where the rows come in runs, else one index_add (no sort)."""
    out = rows.new_zeros(groups.modalities, rows.shape[-1])
    if groups.runs is None:
        return out.index_add_(0, modality_ids.reshape(-1), rows)
    modalities, sizes = groups.split
    for m, rows_slice in zip(modalities, rows.split_with_sizes(sizes)):
        out[m] += rows_slice.sum(0)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: reductions never lose precision."""
    return torch.promote_types(dtype, torch.float32)
