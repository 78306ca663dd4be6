"""TokenAxes: which dims of a tensor are the tokens, and how routing lays out the ids for them.

They come from token provenance (passes/token_provenance.py: the input's batch and
sequence dims followed op by op), via `axes_from_tokens`. A tensor carries tokens
either split (a batch and a sequence dim: [B, T, D], [B, D, T], [T, B, D]),
flattened (one dim of B*T: GPT-2's Conv1D views x as [B*T, D]; or T*B), or as one
sequence position (x[:, t] in a loop over time).

`find_token_axes` matches sizes instead: the fallback where provenance lost the
tokens (an op it does not know). It works on the symbolic shapes export records;
a number that appears twice is reported as ambiguous, not guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import sympy
import torch

from sparsify.passes.token_provenance import MERGED, MIXED, PICKED, SEQUENCE, Tokens, describe_sequence, size_expr


@dataclass(frozen=True)
class TokenAxes:
    """Token dims of one tensor: (batch_dim, seq_dim) when split, (flat_dim,) when flattened, or
    (batch_dim,) with `seq_index` when the tensor is one sequence position (x[:, t] in a loop over time).

    A flattened dim holds tokens in row-major (batch, seq) order, i.e. modality_ids.reshape(-1), unless
    seq_major (the graph flattened a [seq, batch, ...] tensor).
    """

    dims: tuple[int, ...]
    seq_index: int | None = None
    seq_major: bool = False  # a flattened dim made from [seq, batch, ...]: ids.t().reshape(-1)
    # The seq dim holds a sequence laid out from pieces (token_provenance.sequence_pieces), or rows that pick
    # positions of the sequence (token_provenance.PICKED): its label, "" for the input sequence itself
    sequence: str = ""

    @property
    def flat(self) -> bool:
        return len(self.dims) == 1 and self.seq_index is None

    def __str__(self) -> str:
        if self.seq_index is not None:
            return f"batch dim {self.dims[0]} at sequence position {self.seq_index}"
        if self.flat:
            return f"tokens flattened {'(seq-major) ' if self.seq_major else ''}in dim {self.dims[0]}"
        if self.sequence.startswith(PICKED):
            laid_out = f" (the positions that the rows of input '{self.sequence[len(PICKED):]}' pick)"
        else:
            laid_out = f" ({describe_sequence(self.sequence)})" if self.sequence else ""
        return f"batch dim {self.dims[0]}, seq dim {self.dims[1]}{laid_out}"


def shape_env_of(value):
    """The ShapeEnv holding the guards of the capture `value` (a FakeTensor) came from, if any."""
    fake_mode = getattr(value, "fake_mode", None)
    return getattr(fake_mode, "shape_env", None)


def size_exprs(value) -> tuple:
    """Shape of a node's example value as ints (static dims) and sympy expressions (dynamic dims)."""
    return tuple(size_expr(s) for s in value.shape)


def _same_size(a, b, shape_env) -> bool:
    if a == b:
        return True
    if shape_env is None or not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return False
    # Sizes equal only under the guards export recorded (e.g. a padded length where the pad is
    # zero for every input the graph accepts): ask the shape environment, which knows them.
    try:
        return bool(shape_env._maybe_evaluate_static(sympy.Eq(a, b)))
    except Exception:  # a private API: if it changes, fall back to structural equality
        return False


def find_token_axes(shape: Sequence, token_dims: tuple, shape_env=None) -> TokenAxes | str:
    """TokenAxes of a tensor of this shape, or a string saying why they cannot be found."""
    batch, seq = token_dims
    matches = lambda target: [i for i, size in enumerate(shape) if _same_size(size, target, shape_env)]  # noqa: E731
    if batch == 1 and seq == 1:
        # One token: any unit dim can carry its id; the ids broadcast over the rest.
        unit_dims = matches(1)
        if unit_dims:
            return TokenAxes((unit_dims[0],))
        return f"shape {list(shape)} has no dim for the single token"
    if batch == 1:
        # A batch of one leaves no batch dim to find: the seq dim alone carries the tokens.
        seq_dims = matches(seq)
        if len(seq_dims) == 1:
            return TokenAxes((seq_dims[0],))
        return f"shape {list(shape)} has {len(seq_dims)} dims of the sequence length {seq}, expected exactly one"
    if seq == 1:
        # One new token per sequence (a decoding step): a flattened dim of batch * 1 tokens is the batch dim
        # itself and unit dims carry nothing, so the one dim of the batch size holds the tokens.
        batch_dims = matches(batch)
        if len(batch_dims) == 1:
            return TokenAxes((batch_dims[0],), seq_index=0)
        return f"shape {list(shape)} has {len(batch_dims)} dims of the batch size {batch}, expected exactly one"
    batch_dims, seq_dims, flat_dims = matches(batch), matches(seq), matches(batch * seq)
    if len(batch_dims) == 1 and len(seq_dims) == 1 and not flat_dims:
        return TokenAxes((batch_dims[0], seq_dims[0]))
    if len(flat_dims) == 1 and not batch_dims and not seq_dims:
        return TokenAxes((flat_dims[0],))
    if not batch_dims and not seq_dims and not flat_dims:
        return f"shape {list(shape)} has no dim of batch {batch}, sequence {seq} or batch*sequence"
    if len(batch_dims) == 1 and not seq_dims and not flat_dims:
        return (f"shape {list(shape)} has the batch dim but no sequence dim: it holds part of the sequence "
                "(e.g. x[:, t] inside a Python loop over time), which sparsify cannot route per token yet")
    return (
        f"shape {list(shape)} matches batch {batch} / sequence {seq} ambiguously "
        f"(batch dims {batch_dims}, seq dims {seq_dims}, flattened dims {flat_dims}); "
        "if the model specialised these sizes, capture with example inputs whose batch and sequence "
        "sizes differ from every feature size"
    )


def axes_from_tokens(tokens: Tokens, token_dims: tuple, shape: Sequence) -> TokenAxes | str:
    """TokenAxes from a tensor's provenance labels, or a string saying why its tokens cannot be routed."""
    batch, seq, flat, flat_seq_major = (tokens.dims_with(name) for name in ("B", "T", "BT", "TB"))
    laid_out = [d for d, name in enumerate(tokens.labels) if name and name.startswith((SEQUENCE, PICKED))]
    if len(batch) == 1 and len(laid_out) == 1 and not seq and not flat and not flat_seq_major:
        return TokenAxes((batch[0], laid_out[0]), sequence=tokens.labels[laid_out[0]])
    if len(batch) == 1 and len(seq) == 1 and not flat and not flat_seq_major:
        axes = TokenAxes((batch[0], seq[0]))
    elif len(flat) == 1 and not batch and not seq and not flat_seq_major:
        axes = TokenAxes((flat[0],))
    elif len(flat_seq_major) == 1 and not batch and not seq and not flat:
        axes = TokenAxes((flat_seq_major[0],), seq_major=True)
    elif len(batch) == 1 and not seq and not flat and not flat_seq_major and tokens.position not in (None, MIXED):
        axes = TokenAxes((batch[0],), seq_index=tokens.position)
    elif len(seq) == 1 and not batch and not flat and not flat_seq_major and token_dims[0] == 1:
        axes = TokenAxes((seq[0],))  # a batch of one squeezed away: the sequence dim alone holds the tokens
    elif len(batch) == 1 and not seq and not flat and not flat_seq_major and token_dims[1] == 1:
        # A graph for one new token per sequence (a decoding step): each batch row holds that token, mixed
        # at most with the cached state of its own past, and the token's modality routes the row.
        axes = TokenAxes((batch[0],), seq_index=0)
    elif any(name and name.endswith(MERGED) for name in tokens.labels):
        return (f"its dims carry tokens as {tokens}: the batch is flattened with feature dims (heads) there; "
                "sparsify routes the tokens before that flattening or after the batch is split back out")
    elif any(name and ":" in name for name in tokens.labels):
        return (f"its dims carry tokens as {tokens}: the sequence is cut into chunks there; sparsify routes "
                "the tokens before the chunking or after they are joined back")
    elif tokens.dims_with("T+"):
        return (f"its dims carry tokens as {tokens}: the sequence is padded there (T+); sparsify routes the "
                "tokens before the padding or after it is cut off")
    elif len(batch) == 1 and not seq and not flat and not flat_seq_major:
        return (f"its dims carry tokens as {tokens}: the batch dim but no sequence dim or position, i.e. it "
                "mixes several sequence positions (a recurrent state, a sum over the sequence)")
    else:
        return (f"its dims carry tokens as {tokens}: the batch or sequence dim appears more than once (e.g. "
                "attention scores, queries x keys), so no single token owns each element")
    # Cross-check with sizes: a labelled dim has the size of the dim it came from.
    expected = {"B": [batch, token_dims[0]], "T": [seq, token_dims[1]]}
    for name, (dims, size) in expected.items():
        for d in dims:
            if isinstance(size, int) and isinstance(shape[d], int) and shape[d] != size:
                return (f"internal: provenance labels dim {d} of shape {list(shape)} as {name}, but its size "
                        f"differs from {size}; please report this model")
    return axes
