"""How far each modality's copies moved apart: where modalities specialise, read from a routed model.

For every routed parameter and every pair of modalities (i, j):

    distance(i, j) = ||W_i - W_j||_F / ((||W_i||_F + ||W_j||_F) / 2)     0 for equal copies, 2 for opposite ones
    cosine(i, j)   = <W_i - R, W_j - R> / (||W_i - R|| ||W_j - R||)          with R the dense reference's weight

The cosine compares the update directions of two copies since a dense reference (the model upcycled from, or
the checkpoint at conversion): 1 where they moved alike, 0 where independently; None where a copy did not move
(a frozen modality) or no reference was given. `Drift.plot` draws the distances as heatmaps, blocks down,
parameter roles across, one panel per modality pair.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sparsify.errors import SparsifyError, reported
from sparsify.plan import _block_of

OUTSIDE_BLOCKS = "(outside blocks)"


@dataclass(frozen=True)
class DriftEntry:
    fqn: str                   # the routed parameter
    block: str                 # its repeated block (model.layers.3), or OUTSIDE_BLOCKS
    role: str                  # its FQN inside the block (self_attn.q_proj.weight)
    pair: tuple[int, int]      # the two modalities compared
    distance: float
    cosine: float | None


@dataclass
class Drift:
    modalities: int
    entries: list[DriftEntry]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(itertools.combinations(range(self.modalities), 2))

    def get(self, fqn: str, pair: tuple[int, int]) -> DriftEntry:
        for entry in self.entries:
            if entry.fqn == fqn and entry.pair == tuple(pair):
                return entry
        raise KeyError((fqn, pair))

    def matrix(self, pair: tuple[int, int], value: str = "distance"):
        """(blocks, roles, rows of values: NaN where a block has no such role) for one pair of modalities."""
        chosen = [e for e in self.entries if e.pair == tuple(pair)]
        blocks = list(dict.fromkeys(e.block for e in chosen))
        roles = list(dict.fromkeys(e.role for e in chosen))
        grid = [[math.nan] * len(roles) for _ in blocks]
        for e in chosen:
            got = getattr(e, value)
            grid[blocks.index(e.block)][roles.index(e.role)] = math.nan if got is None else got
        return blocks, roles, grid

    def table(self) -> str:
        """One line per parameter: its distance (and cosine) for each pair."""
        lines = ["parameter  " + "  ".join(f"d{i}{j}" + (f" cos{i}{j}" if self._has_cosines() else "")
                                           for i, j in self.pairs)]
        for fqn in dict.fromkeys(e.fqn for e in self.entries):
            cells = []
            for pair in self.pairs:
                e = self.get(fqn, pair)
                cells.append(f"{e.distance:.4f}" + (f" {_fmt(e.cosine)}" if self._has_cosines() else ""))
            lines.append(f"{fqn}  " + "  ".join(cells))
        return "\n".join(lines)

    def _has_cosines(self) -> bool:
        return any(e.cosine is not None for e in self.entries)

    def plot(self, path, title: str | None = None) -> Path:
        """Write the distances as heatmaps (PNG, SVG or PDF by the suffix): blocks down, parameter roles across,
        one panel per modality pair, one colour scale; values written in the cells of small grids."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        pairs = self.pairs
        blocks, roles, _ = self.matrix(pairs[0])
        high = max((e.distance for e in self.entries), default=0.0) or 1.0
        annotate = len(blocks) * len(roles) <= 400
        panel_height = 0.9 + 0.32 * len(blocks)
        fig, axes = plt.subplots(len(pairs), 1, figsize=(3.2 + 0.55 * len(roles), 1.6 + panel_height * len(pairs)),
                                 squeeze=False, constrained_layout=True)
        image = None
        for ax, pair in zip(axes[:, 0], pairs):
            _, _, grid = self.matrix(pair)
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=high)
            ax.set_title(f"modality {pair[0]} vs {pair[1]}", fontsize=9)
            ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
            ax.set_xticks(range(len(roles)), roles if ax is axes[-1, 0] else [], rotation=45, ha="right",
                          fontsize=7)
            if annotate:
                for row, values in enumerate(grid):
                    for col, value in enumerate(values):
                        if value == value:  # not NaN: a block that has this role
                            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if value < 0.6 * high else "black")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="relative Frobenius distance", shrink=0.9)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _reference_tensor(reference, fqn: str) -> torch.Tensor:
    if isinstance(reference, nn.Module):
        try:
            return reference.get_parameter(fqn)
        except AttributeError:
            raise SparsifyError(f"the dense reference has no parameter {fqn!r}: pass the model this routed model "
                                "was converted from") from None
    if fqn not in reference:
        raise SparsifyError(f"the reference state dict has no {fqn!r}: pass the dense model's state dict")
    return reference[fqn]


@reported("sparsify.drift")
def drift(routed, reference: nn.Module | dict | None = None) -> Drift:
    """Distances between modalities' copies of each routed parameter (and, given the dense `reference` the
    model was converted from, the cosines of their updates): see the module."""
    from sparsify.routed_model import RoutedModel

    if not isinstance(routed, RoutedModel):
        raise SparsifyError(f"drift() takes a RoutedModel (from sparsify.convert or sparsify.load), "
                            f"got {type(routed).__name__}")
    modalities = routed.plan.modalities
    if modalities < 2:
        raise SparsifyError("drift compares modalities' copies: this model has one modality")
    fqns = routed.routed_fqns()
    entries = []
    with torch.no_grad():
        for p in routed.plan.params:
            stacked = routed.get_parameter(fqns[p.fqn]).detach().float()
            if stacked.device.type == "meta" or type(stacked).__name__ == "DTensor":
                raise SparsifyError("drift reads every copy's values: call it on an unsharded model with its weights "
                                    "(consolidate a sharded checkpoint, then sparsify.load it)")
            norms = [float(stacked[m].norm()) for m in range(modalities)]
            updates = None
            if reference is not None:
                base = _reference_tensor(reference, p.fqn).detach().float().to(stacked.device)
                if tuple(base.shape) != tuple(stacked.shape[1:]):
                    raise SparsifyError(f"the reference's {p.fqn!r} is {list(base.shape)}, the routed copies "
                                        f"{list(stacked.shape[1:])}: pass the model this one was converted from")
                updates = [stacked[m] - base for m in range(modalities)]
            block = _block_of(p.fqn)
            role = p.fqn[len(block) + 1:] if block else p.fqn
            for i, j in itertools.combinations(range(modalities), 2):
                scale = (norms[i] + norms[j]) / 2
                distance = float((stacked[i] - stacked[j]).norm()) / scale if scale else 0.0
                cosine = None
                if updates is not None:
                    ni, nj = float(updates[i].norm()), float(updates[j].norm())
                    if ni and nj:
                        cosine = float((updates[i] * updates[j]).sum()) / (ni * nj)
                entries.append(DriftEntry(p.fqn, block or OUTSIDE_BLOCKS, role, (i, j), distance, cosine))
    return Drift(modalities, entries)
