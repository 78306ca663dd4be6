"""Token provenance: which dims of every graph value carry the input's batch and sequence dims.

    placeholder input_ids [B, T]          => tokens (B, T)
    view(linear(emb), [B*T, D])           => tokens (BT, -)      ... followed op by op

The batch and sequence dims of the token inputs are followed through the graph
(views and reshapes, permutes, selects, slices, pads, concatenations, splits,
matmuls, einsums, reductions, broadcasting pointwise ops), so each node knows
which of its dims are token dims whatever their sizes: a sequence length equal
to a feature size is never ambiguous. Sizes only decide how a reshape groups
dims (by their products, like any reshape does), never which dim is which.

Labels of one dim:
  "B", "T"     the batch / sequence dim of the inputs
  "BT", "TB"   both flattened into one dim, batch-major / sequence-major
  "T+"         the sequence padded at its end (a causal conv's output, Mamba2's chunk padding):
               slicing it back to the sequence length gives "T" again
  "T:chunk", "T:within"   the (padded) sequence reshaped into [chunks, chunk length] (SSD scans);
               reshaped back, the two give "T" ("T+") again
  "T|x32,t0:0"  a sequence laid out from pieces (sequence_label): positions no input token went into
               ("x<n>": n of them, from values computed from no input, a learned prompt or a zero state;
               "xT": as many as the input sequence has, ProphetNet's n-gram predicting streams) and runs of
               the input sequence ("t<a>:<b>": positions a to T+b, b <= 0), as a concatenation along the
               sequence, a slice of it or a split into its pieces lays them out (CPM-Ant's prompt before
               the tokens, a state shifted one position). Routed with ids laid out the same way, 0 for
               the extra positions (route.Rewriter.ids_with_tokens_in_order); a sequence of extra
               positions only ("T|xT", one n-gram stream split off) has no token to route by: modality 0's
               copies (param_uses, token-free uses).
  "P|target_mapping"  the rows of an input [B, rows, T] that each pick one sequence position (XLNet's
               target_mapping: its query stream has one row per prediction target, mapped to and from the
               sequence by einsums with it); routed by the modality of the position each row weighs most
               (route.Rewriter.picked_ids), exact for one-hot rows, as XLNet's are.
A value holding one sequence position (x[:, t] inside a Python loop over time) has
`position` = t. An op this pass does not know keeps the labels of an input of exactly
its output's shape, or none: the caller then falls back to size matching.

The pass is an analysis: it writes node.meta["sparsify_tokens"] and leaves the graph as is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
import torch.fx

from sparsify.passes import PassResult, node_value

aten = torch.ops.aten
META_KEY = "sparsify_tokens"
MIXED = -1  # position of a value that mixes several sequence positions (a recurrent state)
OUTER, INNER = ":chunk", ":within"  # "T:chunk", "T:within": the sequence reshaped into [chunks, chunk length]
# "B:merged": the batch flattened with feature dims inside it ([B, H, S, D] -> [B * H, S, D], as BLOOM's
# attention bmm's take heads), split back into a batch dim later. No token is routed while merged.
MERGED = ":merged"


SEQUENCE = "T|"  # prefix of a sequence laid out from pieces (module docstring)
SEQUENCE_LONG = "T"  # the count of an extra-positions piece as long as the input sequence: ("x", "T"), "xT"
PICKED = "P|"  # prefix of rows that pick sequence positions, then the name of the input that picks (docstring)
# Ops whose tensor operands give only a shape, dtype or device: a zero state made by x.new_zeros(b, 1, d) holds
# nothing of x's tokens.
SHAPE_ONLY_OPS = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default, aten.new_full.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.full_like.default,
}


def computed_from(graph: torch.fx.Graph, inputs: Sequence[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes whose values are computed from the data of `inputs` (the model's token inputs)."""
    found = set(inputs)
    for node in graph.nodes:
        if node.op == "call_function" and node.target not in SHAPE_ONLY_OPS and \
                any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def sequence_pieces(name: str | None) -> list[tuple] | None:
    """The pieces of a sequence label: [("x", n)] extra positions (n an int, or "T": the input sequence's
    length), [("t", a, b)] input positions a to T+b; "T" is [("t", 0, 0)]. None for any other label."""
    if name == "T":
        return [("t", 0, 0)]
    if not (name and name.startswith(SEQUENCE)):
        return None
    pieces = []
    for piece in name[len(SEQUENCE):].split(","):
        if piece.startswith("x"):
            count = piece[1:]
            pieces.append(("x", count if count == SEQUENCE_LONG else int(count)))
        else:
            start, end = piece[1:].split(":")
            pieces.append(("t", int(start), int(end)))
    return pieces


def sequence_label(pieces: list[tuple]) -> str | None:
    """The label of a sequence laid out from `pieces` (adjacent static extra runs merged); "T" for the
    input's; None for no pieces."""
    merged: list[tuple] = []
    for piece in pieces:
        static = piece[0] == "x" and isinstance(piece[1], int)
        if static and merged and merged[-1][0] == "x" and isinstance(merged[-1][1], int):
            merged[-1] = ("x", merged[-1][1] + piece[1])
        elif piece != ("x", 0):
            merged.append(piece)
    if merged == [("t", 0, 0)]:
        return "T"
    if not merged:
        return None
    return SEQUENCE + ",".join(f"x{p[1]}" if p[0] == "x" else f"t{p[1]}:{p[2]}" for p in merged)


def without_tokens(name: str | None) -> bool:
    """A laid-out sequence of extra positions only ("T|x32", "T|xT"): no input token to route it by."""
    pieces = sequence_pieces(name)
    return bool(pieces) and all(piece[0] == "x" for piece in pieces)


def describe_sequence(name: str) -> str:
    """A sequence label in words: '3 positions without a token, tokens[0:-1]'."""
    def extra(count):
        if count == SEQUENCE_LONG:
            return "as many positions without a token as the sequence has"
        return f"{count} position{'s' if count != 1 else ''} without a token"
    return ", ".join(extra(p[1]) if p[0] == "x" else f"tokens[{p[1] or ''}:{p[2] or ''}]"
                     for p in sequence_pieces(name))


def _piece_length(piece: tuple, seq_expr):
    """A piece's length as an int or a sympy expression of the input sequence length `seq_expr`."""
    if piece[0] == "x":
        return seq_expr if piece[1] == SEQUENCE_LONG else piece[1]
    return seq_expr + piece[2] - piece[1]


@dataclass(frozen=True)
class Tokens:
    """Token labels of one tensor value: one label (or None) per dim, and the sequence position if one."""

    labels: tuple[str | None, ...]
    position: int | None = None

    def dims_with(self, label: str) -> list[int]:
        return [d for d, name in enumerate(self.labels) if name == label]

    @property
    def any(self) -> bool:
        return any(self.labels)

    def __str__(self) -> str:
        where = f" at sequence position {self.position}" if self.position not in (None, MIXED) else ""
        return "[" + ", ".join(name or "-" for name in self.labels) + "]" + where


def tokens_of(node) -> Tokens | None:
    """The provenance of a node's tensor value (None for non-tensors or unknown nodes)."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get(META_KEY)
    return value if isinstance(value, Tokens) else None


def size_expr(size):
    """A size as an int (static) or its sympy expression (dynamic): equal expressions are equal sizes at every
    shape a graph accepts."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _hint(size) -> int | None:
    """The example value of a size (export traced with concrete inputs, so every backed size has one)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return int(size)


def _hints(value) -> tuple[int | None, ...]:
    return tuple(_hint(s) for s in value.shape)


def _none(rank: int) -> Tokens:
    return Tokens((None,) * rank)


def _merge_positions(positions) -> int | None:
    known = {p for p in positions if p is not None}
    if not known:
        return None
    return known.pop() if len(known) == 1 else MIXED


def _broadcast(out_value, inputs: Sequence[tuple[Tokens, Any]]) -> Tokens:
    """Pointwise ops: dims aligned from the right; a dim keeps the label its non-broadcast inputs agree on."""
    rank = out_value.dim()
    out_hints = _hints(out_value)
    labels: list[str | None] = []
    for d in range(rank):
        seen = set()
        for tokens, value in inputs:
            k = d - (rank - value.dim())
            if k < 0:
                continue
            if _hint(value.shape[k]) == out_hints[d]:  # a broadcast (size-1) dim carries no tokens
                seen.add(tokens.labels[k])
        seen.discard(None)
        labels.append(seen.pop() if len(seen) == 1 else None)
    return Tokens(tuple(labels), _merge_positions(t.position for t, _ in inputs))


def _group_label(in_labels: list, in_hints: list, out_hints: list, token_sizes: dict) -> list:
    """Labels of one reshape group: input dims whose product equals the output dims' product."""
    named = [(name, size) for name, size in zip(in_labels, in_hints) if name is not None]
    out = [None] * len(out_hints)
    big_out = [i for i, size in enumerate(out_hints) if size != 1]
    big_in = [size for size in in_hints if size != 1]
    if not named:
        return out
    if len(named) == 1 and (len(big_in) <= 1 or named[0][1] == _product(in_hints)):
        # one token dim (maybe with unit dims): it lands on the output dim of the same size
        name, size = named[0]
        for i, out_size in enumerate(out_hints):
            if out_size == size:
                out[i] = name
                return out
        if size != _product(in_hints):
            # a token dim of size 1 (a decoding step's sequence) reshaped together with feature dims: the
            # outputs are features ([B, 1, H * D] -> [B, H, D] is not the sequence cut into chunks)
            return out
        if name in ("BT", "TB") and len(big_out) == 2:  # a flattened dim unflattened to (batch, seq)
            first, second = ("B", "T") if name == "BT" else ("T", "B")
            if [out_hints[i] for i in big_out] == [token_sizes[first], token_sizes[second]]:
                out[big_out[0]], out[big_out[1]] = first, second
        elif name in ("T", "T+") and len(big_out) == 2:  # the sequence cut into chunks (SSD's [c, l])
            out[big_out[0]], out[big_out[1]] = name + OUTER, name + INNER
        elif name == "B" + MERGED and big_out and out_hints[big_out[0]] == token_sizes.get("B"):
            out[big_out[0]] = "B"  # the batch split back out of a merged dim, outermost as it went in
        return out
    if len(named) == 1 and named[0][0] == "B" and in_labels[in_hints.index(big_in[0])] == "B" and len(big_out) == 1:
        out[big_out[0]] = "B" + MERGED  # the batch, outermost, flattened with feature dims (heads)
        return out
    names = [name for name, size in named]
    if len(big_in) != sum(1 for _, size in named if size != 1) or len(big_out) > 1:
        return out  # tokens merged with a feature dim: no dim holds them alone
    target = big_out[0] if big_out else 0
    if names in (["B", "T"], ["T", "B"]):  # batch and sequence flattened into one dim
        out[target] = "BT" if names == ["B", "T"] else "TB"
    elif len(names) == 2 and names[0].endswith(OUTER) and names[1] == names[0][:-len(OUTER)] + INNER:
        out[target] = names[0][:-len(OUTER)]  # chunks joined back into the sequence
    return out


def _product(sizes) -> int:
    result = 1
    for size in sizes:
        result *= size
    return result


def _reshape(tokens: Tokens, in_value, out_value, token_sizes: dict) -> Tokens:
    """Group input and output dims by equal running products (how any contiguous reshape maps dims)."""
    in_hints, out_hints = list(_hints(in_value)), list(_hints(out_value))
    if None in in_hints or None in out_hints:
        return _none(len(out_hints))
    labels: list[str | None] = []
    i = j = 0
    while i < len(in_hints) or j < len(out_hints):
        gi, gj = [i], [j]
        i, j = i + 1, j + 1
        pin = in_hints[gi[0]] if gi[0] < len(in_hints) else 1
        pout = out_hints[gj[0]] if gj[0] < len(out_hints) else 1
        while pin != pout and (i < len(in_hints) or j < len(out_hints)):
            if (pin < pout and i < len(in_hints)) or j >= len(out_hints):
                pin *= in_hints[i]
                gi.append(i)
                i += 1
            else:
                pout *= out_hints[j]
                gj.append(j)
                j += 1
        gi = [k for k in gi if k < len(in_hints)]
        gj = [k for k in gj if k < len(out_hints)]
        labels.extend(_group_label([tokens.labels[k] for k in gi], [in_hints[k] for k in gi],
                                   [out_hints[k] for k in gj], token_sizes))
    return Tokens(tuple(labels[:len(out_hints)]), tokens.position)


def _drop_dims(tokens: Tokens, dims, keepdim: bool) -> Tokens:
    dims = {d % max(len(tokens.labels), 1) for d in dims}
    if keepdim:
        return Tokens(tuple(None if d in dims else name for d, name in enumerate(tokens.labels)), tokens.position)
    return Tokens(tuple(name for d, name in enumerate(tokens.labels) if d not in dims), tokens.position)


def _select(tokens: Tokens, dim: int, index) -> Tokens:
    dim %= len(tokens.labels)
    name = tokens.labels[dim]
    rest = tuple(n for d, n in enumerate(tokens.labels) if d != dim)
    if name == "T" and isinstance(index, int) and tokens.position is None:
        return Tokens(rest, index if index >= 0 else None)
    if name in ("B", "BT", "TB", "T+") or (name == "T" and not isinstance(index, int)):
        return _none(len(rest))  # one batch row, or a position we cannot name: no longer per token
    return Tokens(rest, tokens.position)


def _slice(node, tokens: Tokens, token_sizes: dict) -> Tokens:
    args = list(node.args) + [None] * (5 - len(node.args))
    source, dim, start, end, step = args[:5]
    in_value, out_value = node_value(source), node_value(node)
    dim %= in_value.dim()
    name = tokens.labels[dim]
    if name is None:
        return tokens
    out_size, in_size = _hint(out_value.shape[dim]), _hint(in_value.shape[dim])
    from_start = start in (None, 0) and step in (None, 1)
    if from_start and out_size == in_size:
        return tokens  # the whole dim
    out_expr, in_expr = size_expr(out_value.shape[dim]), size_expr(in_value.shape[dim])
    if step in (None, 1) and out_expr == in_expr:
        return tokens  # the whole dim, written from the end (x[..., -seq_len:] of a seq_len-long dim)
    labels = list(tokens.labels)
    if name == "T+" and from_start and out_size == token_sizes["T"]:
        labels[dim] = "T"  # the padding cut off again
    else:
        labels[dim] = _sliced_sequence(name, start, end, step)
    return Tokens(tuple(labels), tokens.position)


def _sliced_sequence(name: str, start, end, step) -> str | None:
    """The label of sequence `name` sliced [start:end] with static bounds (a prompt cut off, the last position
    dropped), or None."""
    pieces = sequence_pieces(name)
    end = None if end is None or (isinstance(end, int) and end >= 2 ** 62) else end
    if pieces is None or step not in (None, 1) or not isinstance(start or 0, int) or (start or 0) < 0 or \
            not (end is None or (isinstance(end, int) and end < 0)):
        return None
    for cut, at_front in ((start or 0, True), (-(end or 0), False)):
        while cut > 0:
            index = 0 if at_front else -1
            piece = pieces[index]
            if piece[0] == "x" and piece[1] == SEQUENCE_LONG:
                return None  # a cut into a run as long as the sequence: not a static layout any more
            if piece[0] == "x":
                taken = min(cut, piece[1])
                pieces[index] = ("x", piece[1] - taken)
                if pieces[index][1] == 0:
                    pieces.pop(index)
                cut -= taken
            else:  # into a run of input positions: it is longer than any static cut of a sequence this pass sees
                pieces[index] = ("t", piece[1] + cut, piece[2]) if at_front else ("t", piece[1], piece[2] - cut)
                cut = 0
            if not pieces:
                return None
    return sequence_label(pieces)


def _pad(tokens: Tokens, in_value, out_value, pad: Sequence) -> Tokens:
    """constant_pad_nd: pad lists (before, after) pairs from the last dim backwards. Pads may be sizes
    computed in the graph (graph nodes): a pad of size 0 at capture stays 0 wherever the graph is reused
    (capture.SizeConditions keeps every size in its 0 / 1 / >= 2 class)."""
    labels = list(tokens.labels)
    for k in range(len(pad) // 2):
        dim = in_value.dim() - 1 - k
        if labels[dim] is None or _hint(in_value.shape[dim]) == _hint(out_value.shape[dim]):
            continue
        labels[dim] = "T+" if labels[dim] in ("T", "T+") and pad[2 * k] == 0 else None
    return Tokens(tuple(labels), tokens.position)


def _matmul(a: Tokens, b: Tokens, a_value, b_value, out_value) -> Tokens:
    """matmul/bmm/mm: broadcast batch dims, rows from a, columns from b, the contracted dim dropped."""
    a_labels, b_labels = list(a.labels), list(b.labels)
    if a_value.dim() == 1:
        a_labels = [None] + a_labels
    if b_value.dim() == 1:
        b_labels = b_labels + [None]
    batch_rank = out_value.dim() - (a_value.dim() > 1) - (b_value.dim() > 1)
    out = []
    for d in range(batch_rank):
        names = set()
        for labels in (a_labels[:-2], b_labels[:-2]):
            k = d - (batch_rank - len(labels))
            if k >= 0 and labels[k] is not None:
                names.add(labels[k])
        out.append(names.pop() if len(names) == 1 else None)
    if a_value.dim() > 1:
        out.append(a_labels[-2])
    if b_value.dim() > 1:
        out.append(b_labels[-1])
    return Tokens(tuple(out), _merge_positions([a.position, b.position]))


def _einsum(equation: str, operands: list, out_value) -> Tokens | None:
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    letters: dict[str, str] = {}
    for spec, tokens in zip(inputs.split(","), operands):
        if tokens is None:
            continue
        for letter, name in zip(spec, tokens.labels):
            if name is not None:
                letters.setdefault(letter, name)
    positions = [t.position for t in operands if t is not None]
    return Tokens(tuple(letters.get(letter) for letter in output), _merge_positions(positions))


def _cat(node, inputs: list[Tokens | None], values: list, from_inputs: set, token_sizes: dict) -> Tokens:
    out_value = node_value(node)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out_value.dim()
    pairs = [(t, v) for t, v in zip(inputs, values) if t is not None and v.dim() == out_value.dim()]
    if not pairs:
        return _none(out_value.dim())
    merged = _broadcast(out_value, pairs) if all(v.dim() == out_value.dim() for _, v in pairs) else pairs[0][0]
    labels = list(merged.labels)
    # Along the sequence: a sequence laid out from pieces, where every piece is a run of the sequence or holds
    # positions no input went into (of a static count, or as many as the sequence has); anything else no
    # longer lines up with the tokens.
    pieces = []
    for tensor, tokens, value in zip(node.args[0], inputs, values):
        parts = sequence_pieces(tokens.labels[dim]) if tokens is not None and value.dim() == out_value.dim() \
            else None
        length = size_expr(value.shape[dim]) if value.dim() == out_value.dim() else None
        if parts is not None:
            pieces += parts
        elif tensor not in from_inputs and isinstance(length, int):
            pieces.append(("x", length))
        elif tensor not in from_inputs and length is not None and length == token_sizes["T expr"]:
            pieces.append(("x", SEQUENCE_LONG))
        else:
            pieces = None
            break
    batch = labels.count("B") == 1 and all("B" in tokens.labels for tokens, _ in pairs if tokens.any)
    labels[dim] = sequence_label(pieces) if pieces and batch else None
    return Tokens(tuple(labels), merged.position)


def _split(tokens: Tokens, in_value, out_values: list, dim: int, token_sizes: dict) -> list[Tokens]:
    """A split along a laid-out sequence into its pieces (ProphetNet's main and n-gram streams chunked apart)
    gives each part its pieces' label; a part that cuts a piece, or any split of another token dim, none."""
    dim %= in_value.dim()
    pieces = sequence_pieces(tokens.labels[dim])
    part_labels = _split_sequence(pieces, [size_expr(v.shape[dim]) for v in out_values], token_sizes["T expr"]) \
        if pieces else [None] * len(out_values)
    parts = []
    for value, part_label in zip(out_values, part_labels):
        labels = list(tokens.labels)
        if _hint(value.shape[dim]) != _hint(in_value.shape[dim]):
            labels[dim] = part_label
        parts.append(Tokens(tuple(labels), tokens.position))
    return parts


def _split_sequence(pieces: list[tuple], lengths: list, seq_expr) -> list[str | None]:
    """The labels of consecutive parts of `lengths` cut from a sequence of `pieces`: each part that takes
    whole pieces (lengths compared as expressions, so at every sequence length), None from the first part
    that does not on."""
    labels: list[str | None] = []
    remaining = list(pieces)
    for length in lengths:
        taken, total = [], 0
        while remaining and _differs(total, length):
            piece = remaining.pop(0)
            taken.append(piece)
            total = total + _piece_length(piece, seq_expr)
        if _differs(total, length):
            return labels + [None] * (len(lengths) - len(labels))
        labels.append(sequence_label(taken))
    return labels


def _differs(a, b) -> bool:
    """Two lengths (ints or sympy expressions) that are not equal at every size."""
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) != 0


def _same_shape_input(node, out_value) -> Tokens | None:
    """An unknown op: the labels of an input of exactly the output's shape, if there is one."""
    for arg in node.all_input_nodes:
        value, tokens = node_value(arg), tokens_of(arg)
        if isinstance(value, torch.Tensor) and tokens is not None and tokens.any and \
                _hints(value) == _hints(out_value):
            return tokens
    return None


# Ops that keep every dim of their first input (beyond pointwise ops, which are found by their tag).
SAME_DIMS = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.lift_fresh_copy.default,
    aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,
    aten._safe_softmax.default, aten.cumsum.default, aten.cumprod.default, aten.tril.default, aten.triu.default,
    aten.dropout.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
    aten.full_like.default, aten.rand_like.default, aten.randn_like.default, aten.layer_norm.default,
    aten.rms_norm.default, aten.group_norm.default, aten.index_put.default, aten.index_put_.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.scatter.src, aten.scatter.value, aten.fill.Scalar,
    aten.copy.default,
}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.view_as.default, aten.reshape_as.default}
REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction,
              aten.std.correction, aten.logsumexp.default, aten.prod.dim_int, aten.any.dim, aten.all.dim,
              aten.argmax.default, aten.argmin.default, aten.var_mean.correction, aten.max.dim, aten.min.dim,
              aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_split.Tensor,
          aten.split.sizes, aten.tensor_split.sections, aten.unsafe_chunk.default}
MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default}
ATTENTION = {aten.scaled_dot_product_attention.default}


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _transfer(node: torch.fx.Node, token_sizes: dict, from_inputs: set):
    """Provenance of `node`'s value from its inputs' provenance (`from_inputs`: computed_from the inputs)."""
    target, args = node.target, node.args
    out_value = node_value(node)
    first = tokens_of(args[0]) if args else None
    first_value = node_value(args[0]) if args else None
    if target is operator.getitem:
        source = args[0].meta.get(META_KEY) if isinstance(args[0], torch.fx.Node) else None
        return source[args[1]] if isinstance(source, list) and args[1] < len(source) else None
    if isinstance(out_value, (list, tuple)):
        outs = [v for v in out_value]
        if first is not None and target in SPLITS:
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            return _split(first, first_value, outs, dim, token_sizes)
        if first is not None and target == aten.unbind.int:
            dim = args[1] if len(args) > 1 else 0
            return [_select(first, dim, None) for _ in outs]
        if first is not None and target in (aten.var_mean.correction, aten.max.dim, aten.min.dim):
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or range(first_value.dim()))
            keep = node.kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            return [_drop_dims(first, dims, keep) for _ in outs]
        if target == aten.native_dropout.default and first is not None:
            return [first, first]
        # unknown multi-output ops (a custom scan): each output like an input of its shape
        return [(_same_shape_input(node, v) if isinstance(v, torch.Tensor) else None) for v in outs]
    if not isinstance(out_value, torch.Tensor):
        return None
    rank = out_value.dim()
    if target in VIEW_OPS:
        return _reshape(first, first_value, out_value, token_sizes) if first else None
    if target in SAME_DIMS:
        return first
    if target in (aten.permute.default,):
        return Tokens(tuple(first.labels[d] for d in args[1]), first.position) if first else None
    if target in (aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.mT.default):
        if first is None:
            return None
        labels = list(first.labels)
        n = len(labels)
        if target == aten.transpose.int:
            a, b = args[1] % n, args[2] % n
        elif target == aten.numpy_T.default:
            return Tokens(tuple(reversed(labels)), first.position)
        else:
            a, b = (n - 2, n - 1) if n >= 2 else (0, 0)
        labels[a], labels[b] = labels[b], labels[a]
        return Tokens(tuple(labels), first.position)
    if target == aten.unsqueeze.default:
        if first is None:
            return None
        labels = list(first.labels)
        labels.insert(args[1] % (len(labels) + 1), None)
        return Tokens(tuple(labels), first.position)
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        if first is None:
            return None
        dims = [args[1]] if target == aten.squeeze.dim else list(args[1]) if len(args) > 1 else \
            range(first_value.dim())
        dims = {d % max(first_value.dim(), 1) for d in dims if _hint(first_value.shape[d]) == 1}
        return Tokens(tuple(n for d, n in enumerate(first.labels) if d not in dims), first.position)
    if target == aten.expand.default:
        return _broadcast(out_value, [(first, first_value)]) if first else None
    if target == aten.select.int:
        return _select(first, args[1], args[2]) if first else None
    if target == aten.slice.Tensor:
        return _slice(node, first, token_sizes) if first else None
    if target in (aten.constant_pad_nd.default, aten.pad.default):
        return _pad(first, first_value, out_value, args[1]) if first else None
    if target in (aten.index_select.default, aten.gather.default):
        # values picked along one dim: that dim no longer lines up with the tokens
        if first is None or (target == aten.gather.default and _hints(out_value) != _hints(first_value)):
            return None
        labels = list(first.labels)
        labels[args[1] % len(labels)] = None
        return Tokens(tuple(labels), first.position)
    if target in REDUCTIONS:
        if first is None:
            return None
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims) if dims else list(range(first_value.dim()))
        keep = node.kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        return _drop_dims(first, dims, keep)
    if target in (aten.cat.default, aten.concat.default, aten.stack.default):
        tensors = list(args[0])
        inputs, values = [tokens_of(t) for t in tensors], [node_value(t) for t in tensors]
        if target == aten.stack.default:
            dim = (args[1] if len(args) > 1 else 0) % rank
            merged = _broadcast(node_value(tensors[0]), [(t, v) for t, v in zip(inputs, values) if t is not None]) \
                if any(inputs) else None
            if merged is None:
                return None
            labels = list(merged.labels)
            labels.insert(dim, None)
            return Tokens(tuple(labels), merged.position)
        return _cat(node, inputs, values, from_inputs, token_sizes)
    if target == aten.linear.default:
        return Tokens(first.labels[:-1] + (None,), first.position) if first else None
    if target in (aten.addmm.default, aten.baddbmm.default):
        a, b = tokens_of(args[1]), tokens_of(args[2])
        return _matmul(a or _none(node_value(args[1]).dim()), b or _none(node_value(args[2]).dim()),
                       node_value(args[1]), node_value(args[2]), out_value)
    if target in MATMULS:
        a, b = tokens_of(args[0]), tokens_of(args[1])
        if a is None and b is None:
            return None
        return _matmul(a or _none(first_value.dim()), b or _none(node_value(args[1]).dim()),
                       first_value, node_value(args[1]), out_value)
    if target == aten.einsum.default:
        return _einsum(args[0], [tokens_of(t) for t in args[1]], out_value)
    if target in ATTENTION:
        # rows are the queries' tokens; the keys' dim is contracted
        return Tokens(first.labels[:-1] + (None,), first.position) if first else None
    if target == aten.embedding.default:
        indices = tokens_of(args[1])
        return Tokens(indices.labels + (None,), indices.position) if indices else None
    if target in (aten.conv1d.default, aten.convolution.default) and first is not None and rank == 3:
        time = first.labels[2]
        same_length = _hint(out_value.shape[2]) == _hint(first_value.shape[2])
        time = time if same_length else ("T+" if time in ("T", "T+") else None)
        return Tokens((first.labels[0], None, time), first.position)
    if target in (aten.flip.default, aten.roll.default):
        if first is None:
            return None
        dims = args[1] if target == aten.flip.default else (args[2] if len(args) > 2 else [])
        dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
        return Tokens(tuple(None if d in dims else n for d, n in enumerate(first.labels)), first.position)
    tensor_inputs = [(tokens_of(a), node_value(a)) for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]
    if _is_pointwise(target) or target in (aten.where.self,):
        known = [(t, v) for t, v in tensor_inputs if t is not None]
        return _broadcast(out_value, known) if known else None
    return _same_shape_input(node, out_value)


def token_inputs(user_inputs: Sequence[torch.fx.Node], token_dims: tuple) -> dict[torch.fx.Node, Tokens]:
    """The user inputs that carry tokens: the first with >= 2 dims has (batch, seq) leading, and so does
    every other input whose leading sizes are the same expressions (an attention mask, position ids); an
    input [batch, rows, seq] of another row count picks positions with its rows (XLNet's target_mapping)."""
    out: dict[torch.fx.Node, Tokens] = {}
    symbolic = any(not isinstance(s, int) for s in token_dims)
    for node in user_inputs:
        value = node_value(node)
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        sizes = tuple(size_expr(s) for s in value.shape)
        if not out or (sizes[:2] == tuple(token_dims) and symbolic):
            out[node] = Tokens(("B", "T") + (None,) * (value.dim() - 2))
        elif value.dim() == 3 and symbolic and sizes[0] == token_dims[0] and sizes[2] == token_dims[1] and \
                sizes[1] != token_dims[1]:
            out[node] = Tokens(("B", PICKED + node.name, "T"))
    return out


def token_provenance(graph_module: torch.fx.GraphModule, user_inputs: Sequence[torch.fx.Node],
                     token_dims: tuple, from_inputs: set | None = None) -> PassResult:
    """Annotate every node with its Tokens (node.meta["sparsify_tokens"]). Analysis only. `from_inputs`:
    computed_from(graph, user_inputs), where the caller has it."""
    sources = token_inputs(user_inputs, token_dims)
    first = next(iter(sources), None)
    hints = _hints(node_value(first)) if first is not None else (None, None)
    # sizes at capture, and the sequence length's expression (a piece as long as the sequence is one at any length)
    token_sizes = {"B": hints[0], "T": hints[1], "T expr": token_dims[1]}
    if from_inputs is None:
        from_inputs = computed_from(graph_module.graph, list(user_inputs))
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            node.meta[META_KEY] = sources.get(node)
        elif node.op == "call_function":
            try:
                node.meta[META_KEY] = _transfer(node, token_sizes, from_inputs)
            except (IndexError, TypeError, AttributeError, ValueError, KeyError):
                # an op whose arguments this pass reads differently: it knows nothing, sizes decide later
                node.meta[META_KEY] = None
            tokens = node.meta[META_KEY]
            value = node_value(node)
            if isinstance(tokens, Tokens) and isinstance(value, torch.Tensor) and len(tokens.labels) != value.dim():
                node.meta[META_KEY] = None  # a rule that got the rank wrong is not trusted
        else:
            node.meta[META_KEY] = None
    return PassResult(graph_module, False)

