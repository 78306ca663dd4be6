"""Analysis: find the normalisation layers of a captured graph in any of their spellings.

    mul(w, to(mul(h, rsqrt(add(mean(pow(h, 2), [-1], True), eps)))))   =>  meta["sparsify_norm"] = NormMatch(rms, h, w, eps)
    add(mul(div(sub(h, mean(h)), sqrt(add(var(h), eps))), w), b)       =>  meta["sparsify_norm"] = NormMatch(layer, h, w, b, eps)

Patterns are written as Python functions (below), every spelling is enumerated
(rsqrt, 1/sqrt, x/sqrt, pow(., -0.5), 1/x**0.5, x/x**0.5, aten.rms_norm; the square as pow or h*h; the weight on
either side; a cast between normalising and scaling; for LayerNorm var, var_mean
or a mean of squares), each variant is traced by torch.export to ATen as the
model was, and torch.fx's SubgraphMatcher finds it. The literals that vary
between models (eps, the normalised size, a cast's dtype) become placeholders of
the pattern, so they match any value; a match filter then checks them (eps is a
number, sizes are the last dim's, weight and bias are per feature). Every other
literal (the exponent 2, dim -1, keepdim) must be equal.

The route pass rewrites each match into one fused routed op. The match is not
rewritten here with replace_pattern (the PT2E rewriter) because the replacement
needs operands the pattern does not have (the modality ids, the stacked weight)
and a literal it must carry over (eps); route writes it from the NormMatch.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import sys
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from sparsify.passes import canonicalize as canonicalize_module
from sparsify.passes import pattern_cache
from sparsify.passes.canonicalize import METADATA_ASSERTS, canonicalize

aten = torch.ops.aten
META_KEY = "sparsify_norm"
EPS_SENTINEL = 0.0123456789   # the eps literal in traced patterns; a match reads the model's own
TRACE_DIM = 7                 # feature size of traced patterns: a literal equal to it is the normalised size


@dataclass
class NormMatch:
    kind: str                      # "rms" | "layer"
    normalized: torch.fx.Node      # h: the tensor whose last dim is normalised
    weight: torch.fx.Node | None   # the scale's operand (a parameter, possibly through views / 1 + w)
    bias: torch.fx.Node | None
    eps: float
    output: torch.fx.Node          # the node whose value the fused op replaces
    nodes: frozenset               # every node of the match (placeholders excluded)
    spelling: str                  # which variant matched, for the plan summary


# -- the patterns: Python functions of (h, w[, b]) -----------------------------------------------------
def _mean_square(h, square):
    return (h.pow(2) if square == "pow" else h * h).mean(-1, keepdim=True)


def _inverse_rms_times(h, ms, denominator):
    if denominator == "rsqrt":
        return h * torch.rsqrt(ms + EPS_SENTINEL)
    if denominator == "rsqrt_left":
        return torch.rsqrt(ms + EPS_SENTINEL) * h
    if denominator == "reciprocal_sqrt":
        return h * (1.0 / torch.sqrt(ms + EPS_SENTINEL))
    if denominator == "pow_neg_half":  # Gemma 3n / Gemma 4: torch.pow(ms + eps, -0.5), as JAX spells it
        return h * torch.pow(ms + EPS_SENTINEL, -0.5)
    if denominator == "pow_neg_half_left":
        return torch.pow(ms + EPS_SENTINEL, -0.5) * h
    if denominator == "reciprocal_pow_half":
        return h * (1.0 / (ms + EPS_SENTINEL) ** 0.5)
    if denominator == "div_pow_half":
        return h / (ms + EPS_SENTINEL) ** 0.5
    return h / torch.sqrt(ms + EPS_SENTINEL)


def _scaled(normed, w, weight_side, cast):
    if cast:  # Llama: normalise in fp32, cast back, then scale
        normed = normed.to(torch.float16)
    return w * normed if weight_side == "left" else normed * w


# Every spelling of 1 / sqrt(mean square + eps) models use (export puts eps after the statistic whichever
# way the model adds them, so the order needs no variant of its own).
RMS_DENOMINATORS = ("rsqrt", "rsqrt_left", "reciprocal_sqrt", "div_sqrt", "pow_neg_half", "pow_neg_half_left",
                    "reciprocal_pow_half", "div_pow_half")


def rms_norm_variants():
    """(spelling, function(h, w)) for every RMSNorm spelling."""
    for square, denominator, side, cast in itertools.product(
            ("pow", "mul"), RMS_DENOMINATORS, ("left", "right"), (False, True)):
        def fn(h, w, square=square, denominator=denominator, side=side, cast=cast):
            return _scaled(_inverse_rms_times(h, _mean_square(h, square), denominator), w, side, cast)
        yield f"rms_norm({square}, {denominator}, weight {side}{', cast before scale' if cast else ''})", fn
    yield "aten.rms_norm", lambda h, w: torch.nn.functional.rms_norm(h, (TRACE_DIM,), w, EPS_SENTINEL)


def _centered_over_std(h, variance, denominator):
    mean = h.mean(-1, keepdim=True)
    centered = h - mean
    if variance == "var":
        var = h.var(-1, keepdim=True, unbiased=False)
    elif variance == "var_mean":
        var, mean = torch.var_mean(h, -1, keepdim=True, unbiased=False)
        centered = h - mean
    else:
        var = (centered * centered).mean(-1, keepdim=True) if variance == "mean_mul" else \
            centered.pow(2).mean(-1, keepdim=True)
    if denominator == "rsqrt":
        return centered * torch.rsqrt(var + EPS_SENTINEL)
    if denominator == "pow_neg_half":
        return centered * torch.pow(var + EPS_SENTINEL, -0.5)
    if denominator == "div_pow_half":
        return centered / (var + EPS_SENTINEL) ** 0.5
    return centered / torch.sqrt(var + EPS_SENTINEL)


def layer_norm_variants():
    """(spelling, function(h, w, b)) for every decomposed LayerNorm spelling (aten.layer_norm is an op route knows)."""
    for variance, denominator, side in itertools.product(
            ("var", "var_mean", "mean_pow", "mean_mul"), ("rsqrt", "div_sqrt", "pow_neg_half", "div_pow_half"),
            ("left", "right")):
        def fn(h, w, b, variance=variance, denominator=denominator, side=side):
            return _scaled(_centered_over_std(h, variance, denominator), w, side, False) + b
        yield f"layer_norm({variance}, {denominator}, weight {side})", fn


class _Patterns(torch.nn.Module):
    """Every pattern function side by side, each on its own inputs: one export traces them all."""

    def __init__(self, fns, arities):
        super().__init__()
        self.fns, self.arities = fns, arities

    def forward(self, *args):
        outputs, start = [], 0
        for fn, arity in zip(self.fns, self.arities):
            outputs.append(fn(*args[start:start + arity]))
            start += arity
        return tuple(outputs)


def _export_separately(fns, arities) -> list[torch.fx.Graph]:
    """The ATen graph of each pattern function, as capture traces models. One torch.export of all of them,
    then each output's ancestors copied into a graph of its own: an export costs ~35 ms before it traces
    anything, and every capture in a process needs the ~50 patterns."""
    # A generator of its own: the first capture in a process traces the patterns, and drawing from the global
    # one would make a later init="independent" (or the user's own random numbers) depend on whether an
    # earlier convert ran in the same process.
    generator = torch.Generator().manual_seed(0)
    example = [t for arity in arities for t in [torch.randn(2, 3, TRACE_DIM, generator=generator)] +
               [torch.randn(TRACE_DIM, generator=generator) for _ in range(arity - 1)]]
    exported = torch.export.export(_Patterns(fns, arities), tuple(example), strict=False).graph_module
    together = canonicalize(exported).graph_module.graph  # as capture leaves a model's graph
    outputs = together.output_node().args[0]
    graphs = []
    for output in outputs:
        needed, stack = set(), [output]
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        graph, copies = torch.fx.Graph(), {}
        for node in together.nodes:  # in order, so placeholders keep their order and every input comes first
            if node in needed:
                copies[node] = graph.node_copy(node, lambda n: copies[n])
        graph.output((copies[output],))
        graphs.append(graph)
    return graphs


@dataclass
class _TracedPattern:
    kind: str
    spelling: str
    graph: torch.fx.Graph
    inputs: list[torch.fx.Node]    # pattern placeholders: h, w[, b]
    eps: torch.fx.Node             # placeholder standing for the eps literal
    sizes: list[torch.fx.Node]     # placeholders standing for the normalised size in shape lists
    dtypes: list[torch.fx.Node]    # placeholders standing for cast dtypes


def _wildcards(kind: str, spelling: str, graph: torch.fx.Graph) -> _TracedPattern:
    """Turn a traced pattern's wildcard literals into placeholders: a placeholder of a pattern matches any
    value, a literal only an equal one."""
    for node in list(graph.nodes):
        if node.target in METADATA_ASSERTS:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        eps = graph.placeholder("eps")
    sizes, dtypes = [], []

    def wildcard(value):
        if isinstance(value, float) and value == EPS_SENTINEL:
            return eps
        if isinstance(value, (list, tuple)):
            return type(value)(_size(v) for v in value)
        if isinstance(value, torch.dtype):
            with graph.inserting_before(first):
                dtypes.append(graph.placeholder(f"dtype_{len(dtypes)}"))
            return dtypes[-1]
        return value

    def _size(value):
        if isinstance(value, int) and not isinstance(value, bool) and value == TRACE_DIM:
            with graph.inserting_before(first):
                sizes.append(graph.placeholder(f"size_{len(sizes)}"))
            return sizes[-1]
        return value

    for node in list(graph.nodes):
        if node.op == "call_function":
            node.args = tuple(wildcard(a) for a in node.args)
            node.kwargs = {k: wildcard(v) for k, v in node.kwargs.items()}
    graph.lint()
    return _TracedPattern(kind, spelling, graph, inputs, eps, sizes, dtypes)


@functools.cache
def traced_patterns() -> tuple[_TracedPattern, ...]:
    """Every variant, traced once (read from the disk cache of an earlier process where it holds them: see
    pattern_cache.py). Longer patterns first: a LayerNorm is not also an RMSNorm."""
    try:
        cache_key = pattern_cache.key(inspect.getsource(sys.modules[__name__]),
                                      inspect.getsource(canonicalize_module))
    except (OSError, TypeError):  # no source to key the cache by (a frozen install): trace, as before the cache
        cache_key = None
    cached = pattern_cache.load(CACHE_NAME, cache_key) if cache_key else None
    if cached is not None:
        try:
            return tuple(_decoded(entry) for entry in cached)
        except Exception:  # a cache written by other code: trace again
            pass
    variants = [("layer", s, fn, 3) for s, fn in layer_norm_variants()]
    variants += [("rms", s, fn, 2) for s, fn in rms_norm_variants()]
    graphs = _export_separately([fn for _, _, fn, _ in variants], [arity for *_, arity in variants])
    patterns = [_wildcards(kind, spelling, graph) for (kind, spelling, _, _), graph in zip(variants, graphs)]
    patterns = tuple(sorted(patterns, key=lambda p: -len(p.graph.nodes)))
    if cache_key:
        pattern_cache.save(CACHE_NAME, cache_key, [_encoded(p) for p in patterns])
    return patterns


CACHE_NAME = "norm_patterns"


def _encoded(pattern: _TracedPattern) -> dict:
    return {"kind": pattern.kind, "spelling": pattern.spelling, "graph": pattern_cache.encode_graph(pattern.graph),
            "inputs": [n.name for n in pattern.inputs], "eps": pattern.eps.name,
            "sizes": [n.name for n in pattern.sizes], "dtypes": [n.name for n in pattern.dtypes]}


def _decoded(entry: dict) -> _TracedPattern:
    graph, nodes = pattern_cache.decode_graph(entry["graph"])
    return _TracedPattern(entry["kind"], entry["spelling"], graph, [nodes[n] for n in entry["inputs"]],
                          nodes[entry["eps"]], [nodes[n] for n in entry["sizes"]], [nodes[n] for n in entry["dtypes"]])


# -- the match filter ----------------------------------------------------------------------------------
def _eps(value, h: torch.fx.Node) -> float | None:
    """The eps a match read; None (torch.nn.RMSNorm's default) means the dtype's machine epsilon."""
    if value is None:
        return torch.finfo(h.meta["val"].dtype).eps
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _last_dim_size(node) -> object:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else None


def _is_per_feature(node, size) -> bool:
    """A weight or bias of the normalised features: 1-D of the last dim's size (a parameter's view or 1 + w)."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == size


def _accepted(pattern: _TracedPattern, nodes_map: dict) -> tuple | None:
    """(h, params, eps) of a match that passes the filter, else None."""
    h, *params = [nodes_map[p] for p in pattern.inputs]
    size = _last_dim_size(h)
    if size is None or not all(_is_per_feature(p, size) for p in params):
        return None
    if any(nodes_map[s] not in (size, -1) for s in pattern.sizes):
        return None  # a reduction or normalised shape over the last dim only
    if any(not isinstance(nodes_map[d], torch.dtype) for d in pattern.dtypes):
        return None
    eps = _eps(nodes_map[pattern.eps], h)
    return None if eps is None else (h, params, eps)


def find_norms(graph_module: torch.fx.GraphModule) -> list[NormMatch]:
    """Every norm layer of the graph in a spelling the patterns know; each match is also written to the
    meta of the nodes that use its weight and bias (the scale mul, the bias add, or the rms_norm op)."""
    graph = graph_module.graph
    claimed: set[torch.fx.Node] = set()
    matches: list[NormMatch] = []
    for pattern in traced_patterns():
        matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True)
        for internal in matcher.match(graph):
            nodes = frozenset(g for p, g in internal.nodes_map.items() if p.op not in ("placeholder", "output"))
            if nodes & claimed:
                continue
            accepted = _accepted(pattern, internal.nodes_map)
            if accepted is None:
                continue
            h, params, eps = accepted
            (output,) = internal.returning_nodes
            match = NormMatch(kind=pattern.kind, normalized=h, weight=params[0],
                              bias=params[1] if len(params) > 1 else None, eps=eps, output=output,
                              nodes=nodes, spelling=pattern.spelling)
            matches.append(match)
            claimed |= nodes
            for node in nodes:
                if any(arg in (match.weight, match.bias) for arg in node.args):
                    node.meta[META_KEY] = match
    return matches


def norm_match(node: torch.fx.Node) -> NormMatch | None:
    return node.meta.get(META_KEY)
