"""Capture: torch.export (strict=False) of a module into an ATen-level graph with dynamic token dims.

The captured graph is the *lifted* one: parameters, buffers and constants are
graph inputs, looked up by FQN at call time. So a routed model owns its
parameters as an ordinary nn.Module tree, and every re-capture (new shape
signature, dtype, device, train/eval mode) binds the same parameter objects.
"""
from __future__ import annotations

import inspect
import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from sparsify import forward_state, frontends
from sparsify.errors import CaptureError, SparsifyError
from sparsify.passes.canonicalize import canonicalize
from sparsify.passes.token_provenance import size_expr

SizeExpr = Any  # int for a static dim, sympy.Expr for a dynamic one


def bind_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call to `module.forward`'s signature and return keyword arguments in signature order.

    Capturing and calling always go through this, so `m(x)` and `m(input_ids=x)`
    produce the same inputs and hit the same captured graph.
    """
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"cannot bind the inputs to {type(module).__name__}.forward{signature}: {e}") from None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise CaptureError(
                    f"{type(module).__name__}.forward takes *{name}; sparsify needs named inputs. "
                    "Wrap the model in a module whose forward names each input."
                )
        else:
            out[name] = value
    return out


def primary_tensor(inputs: dict[str, Any]) -> torch.Tensor:
    """The first tensor input with at least two dims: its leading (batch, seq) dims are the tokens."""
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2:
            return leaf
    raise CaptureError(
        "no input tensor with (batch, seq, ...) dims was found; sparsify routes tokens, so the model's "
        "first tensor input must have its batch and sequence dims first (e.g. input_ids [batch, seq])."
    )


@dataclass
class CapturedGraph:
    """A lifted export graph plus what is needed to call it and to route it."""

    graph_module: torch.fx.GraphModule
    # One (kind, target) per placeholder in order: ("parameter", fqn), ("buffer", fqn),
    # ("constant", name) or ("input", leaf index into the flattened user inputs).
    placeholders: list[tuple[str, Any]]
    input_spec: pytree.TreeSpec
    output_spec: pytree.TreeSpec
    mutated_buffers: list[str]
    constants: dict[str, Any]
    # Size expressions of the batch and sequence dims of the token tensor.
    token_dims: tuple[SizeExpr, SizeExpr]
    # Shape expressions of every tensor user input, and the allowed range of each symbol.
    input_shapes: list[tuple[SizeExpr, ...] | None]
    ranges: dict[sympy.Symbol, tuple[float, float]] = field(default_factory=dict)
    size_conditions: "SizeConditions" = field(default_factory=lambda: SizeConditions())
    # The ExportedProgram whose graph_module this is (its signature, module call graph and ranges).
    exported: Any = field(default=None, repr=False)
    _verdicts: dict = field(default_factory=dict, repr=False)
    # The parameter-use analysis of this graph (passes/param_uses.py) where the plan made one: route reuses it.
    param_uses: dict | None = field(default=None, repr=False)
    # What the forward read and checkpointed while captured (forward_state.py): when this graph may run.
    state: Any = field(default=None, repr=False)

    def user_input_nodes(self) -> list[torch.fx.Node]:
        """Placeholders of the model's own inputs, in order."""
        nodes = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        return [n for n, (kind, _) in zip(nodes, self.placeholders) if kind == "input"]

    def accepts(self, flat_inputs: list) -> bool:
        """Whether these flattened user inputs fit what this graph was captured for: ranks, specialised
        sizes exactly, symbolic sizes within their ranges and consistent, and every guard export recorded
        on them (e.g. "the padded length is at most one chunk") true, with every size in the graph in the
        same 0 / 1 / >= 2 class as at capture. In doubt, no: the caller captures again."""
        binding: dict[sympy.Symbol, int] = {}
        for shape, leaf in zip(self.input_shapes, flat_inputs):
            if shape is None:
                continue
            if len(shape) != leaf.dim():
                return False
            for expr, size in zip(shape, leaf.shape):
                if isinstance(expr, int):
                    if expr != size:
                        return False
                elif isinstance(expr, sympy.Symbol):
                    low, high = self.ranges.get(expr, (0, float("inf")))
                    if binding.setdefault(expr, size) != size or not low <= size <= high:
                        return False
                else:  # an expression of other dims' symbols (e.g. 2*s0)
                    value = expr.subs(binding)
                    if value.free_symbols or int(value) != size:
                        return False
        key = tuple(sorted((str(k), v) for k, v in binding.items()))
        if key not in self._verdicts:  # sympy is slow: decide once per set of sizes
            self._verdicts[key] = self.size_conditions.hold(binding)
        return self._verdicts[key]


def _size_class(value: int) -> int:
    """0, 1 or 2 (for >= 2): the classes in which tracing decides broadcasting and emptiness differently; a
    negative symbolic value (a slice from the end, x[..., -seq:]) likewise -1 or -2 (for <= -2)."""
    return max(min(int(value), 2), -2)


@dataclass
class SizeConditions:
    """What a captured graph assumed about its input sizes beyond their ranges.

    `guards`: the boolean conditions export's ShapeEnv recorded while tracing (torch.export does not turn
    them all into range constraints: a chunked scan's "the padded length is one chunk" stays a guard).
    `size_classes`: every symbolic size in the graph with its 0 / 1 / >= 2 class at capture. Tracing
    makes broadcasting decisions on sizes of 1 without always recording a guard; a graph is reused
    only where every size stays in its class.
    """

    guards: list = field(default_factory=list)
    size_classes: dict = field(default_factory=dict)

    def hold(self, binding: dict) -> bool:
        replacements = {symbol: sympy.Integer(value) for symbol, value in binding.items()}
        for guard in self.guards:
            verdict = guard.xreplace(replacements)
            if verdict not in (sympy.true, True):  # false, or not decidable from the inputs: capture again
                return False
        for expr, size_class in self.size_classes.items():
            value = expr.xreplace(replacements)
            if not value.is_number or _size_class(value) != size_class:
                return False
        return True

    @classmethod
    def of(cls, graph_module: torch.fx.GraphModule, input_symbols: set) -> "SizeConditions":
        shape_env, sizes = None, {}
        for node in graph_module.graph.nodes:
            value = node.meta.get("val")
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                shape_env = shape_env or getattr(getattr(v, "fake_mode", None), "shape_env", None)
                symbolic = list(v.shape) if isinstance(v, torch.Tensor) else [v] if isinstance(v, torch.SymInt) else []
                for size in symbolic:
                    if isinstance(size, torch.SymInt) and size.node.hint is not None:
                        sizes[size.node.expr] = _size_class(size.node.hint)
        if shape_env is None:
            return cls()
        recorded = [guard.expr for guard in shape_env.guards]
        recorded += [a.expr for asserts in shape_env.deferred_runtime_asserts.values() for a in asserts]
        # Conditions on sizes computed inside the graph (data-dependent, "unbacked") are checked by the
        # graph's own runtime asserts; those on the inputs' sizes are checked here.
        guards = [g for g in recorded if g.free_symbols and g.free_symbols <= input_symbols]
        size_classes = {e: c for e, c in sizes.items() if e.free_symbols and e.free_symbols <= input_symbols}
        return cls(guards=list(dict.fromkeys(guards)), size_classes=size_classes)


def capture(module: torch.nn.Module, inputs: dict[str, Any], every_dim: bool = False,
            static: bool = False, state_of: torch.nn.Module | None = None) -> CapturedGraph:
    """Export `module(**inputs)` with the batch and sequence dims of token-shaped inputs marked dynamic
    (`every_dim`: every dim of every tensor input, for a decoding step whose masks are shaped by the query
    and cache lengths in model-specific ways; `static`: no dim dynamic, a graph for these shapes only, which
    exports in less than half the time: for planning, see convert_checkpoint.plan_for).

    Dim.AUTO lets export keep a dim dynamic where the model allows and specialise
    it where the model's code does (a size of 1 always specialises: a decode step of one token gets its
    own graph); the caller re-captures for shapes a specialised graph does not accept. `state_of`: the
    module tree whose reads key the graph (forward_state.py), `module` by default.
    """
    token = primary_tensor(inputs)
    batch, seq = token.shape[0], token.shape[1]

    def dynamic_spec(leaf):
        if isinstance(leaf, torch.Tensor) and every_dim and leaf.dim() > 0:
            return {d: Dim.AUTO for d in range(leaf.dim())}
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2 and tuple(leaf.shape[:2]) == (batch, seq):
            return {0: Dim.AUTO, 1: Dim.AUTO}
        if isinstance(leaf, torch.Tensor) and leaf.dim() == 3 and leaf.shape[0] == batch and leaf.shape[2] == seq:
            return {0: Dim.AUTO, 2: Dim.AUTO}  # rows that pick positions ([batch, rows, seq], XLNet's targets)
        return None

    dynamic_shapes = None if static else {name: pytree.tree_map(dynamic_spec, value) for name, value in inputs.items()}
    try:
        # Without grad: a capture during a training step (a new shape class) must not reach the step's
        # saved-tensor hooks (checkpointing, offloading) with fake tensors. The model's Python still sees the
        # caller's grad mode through torch.is_grad_enabled() (forward_state.recorded).
        with forward_state.recorded(state_of or module) as state, _inputs_as_named_parameters(module, list(inputs)), \
                frontends.graph_forms(), torch.no_grad(), _quiet_specialisation():
            exported = torch.export.export(module, (), dict(inputs), dynamic_shapes=dynamic_shapes, strict=False)
    except SparsifyError:
        raise
    except Exception as e:  # export raises many types; all mean "this model cannot be captured as is"
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {str(e).strip()[:2000]}\n"
            "sparsify captures models with torch.export(strict=False). Make the forward traceable "
            "(no data-dependent Python control flow on tensor values, no unsupported outputs such as a cache "
            "object: pass use_cache=False for Hugging Face models), or pass example_inputs that exercise "
            "the path you train."
        ) from e
    captured = _from_exported(exported, token)
    state.guards = state.guards.settled()
    captured.state = state
    return captured


# torch.export logs a warning for every Dim.AUTO dim it specialises ("dimension ... 0/1 specialized"): here that
# is expected (a decoding step's batch of 1, a dim the model's code fixes) and handled, since a graph records
# which shapes it accepts and the caller captures again for others.
_SPECIALISATION_LOGGER = "torch._export.non_strict_utils"


@contextmanager
def _quiet_specialisation():
    logger = logging.getLogger(_SPECIALISATION_LOGGER)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _inputs_as_named_parameters(module: torch.nn.Module, names: list[str]):
    """While exporting, give `module.forward` one named parameter per input.

    Inputs that land in a `**kwargs` parameter (a Hugging Face model that takes
    `use_cache` only that way) cannot be given dynamic shapes: torch.export (2.13)
    fails inside its own constraint code whichever way the spec nests them. The
    instance's forward is replaced by one with a parameter per input that calls
    the real forward, so the module, its FQNs and its module stack are unchanged.
    """
    parameters = inspect.signature(module.forward).parameters
    if all(name in parameters for name in names):
        yield
        return
    real_forward = module.forward

    def forward(self, **inputs):
        return real_forward(**inputs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names])
    with forward_replaced(module, types.MethodType(forward, module)):
        yield


@contextmanager
def attribute_replaced(module: torch.nn.Module, name: str, value):
    """`module.<name>` is `value` (an instance attribute, over the class's method) inside the block, then
    what it was."""
    saved = module.__dict__.get(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        if saved is None:
            delattr(module, name)
        else:
            setattr(module, name, saved)


def forward_replaced(module: torch.nn.Module, forward):
    """`module.forward` is `forward` inside the block, then what it was."""
    return attribute_replaced(module, "forward", forward)


def _from_exported(exported: torch.export.ExportedProgram, token: torch.Tensor) -> CapturedGraph:
    signature = exported.graph_signature
    graph_module = canonicalize(exported.graph_module).graph_module
    placeholder_nodes = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    placeholders: list[tuple[str, Any]] = []
    user_index = 0
    for spec in signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            placeholders.append(("parameter", spec.target))
        elif spec.kind == InputKind.BUFFER:
            placeholders.append(("buffer", spec.target))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            placeholders.append(("constant", spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            placeholders.append(("input", user_index))
            user_index += 1
        else:
            raise CaptureError(f"unsupported exported input kind {spec.kind} for {spec.target}")
    mutated_buffers = []
    for spec in signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated_buffers.append(spec.target)
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"unsupported exported output kind {spec.kind}: sparsify cannot route a model "
                               "whose forward mutates its inputs or parameters")

    user_vals = [n.meta.get("val") for n, (kind, _) in zip(placeholder_nodes, placeholders) if kind == "input"]
    input_shapes = [tuple(size_expr(s) for s in v.shape) if isinstance(v, torch.Tensor) else None for v in user_vals]
    # The token tensor is the first user input with >= 2 dims, as in primary_tensor().
    token_shape = next(s for s in input_shapes if s is not None and len(s) >= 2)
    ranges = {}
    for symbol, value_range in exported.range_constraints.items():
        # float, not int: an unbacked symbol (a count read from a tensor, as a static cache's length) is unbounded
        # below (-oo), which has no int.
        ranges[symbol] = (float(value_range.lower), float(value_range.upper))
    input_symbols = {sym for shape in input_shapes if shape for size in shape
                     if isinstance(size, sympy.Expr) for sym in size.free_symbols}
    return CapturedGraph(
        size_conditions=SizeConditions.of(graph_module, input_symbols),
        exported=exported,
        graph_module=graph_module,
        placeholders=placeholders,
        input_spec=exported.call_spec.in_spec,
        output_spec=exported.call_spec.out_spec,
        mutated_buffers=mutated_buffers,
        constants=dict(exported.constants),
        token_dims=(token_shape[0], token_shape[1]),
        input_shapes=input_shapes,
        ranges=ranges,
    )
