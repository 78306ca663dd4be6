"""RoutingPlan: which parameters are routed, in what role, over how many modalities.

Presets pick parameters by what the graph does with them, never by model class:
- "mot":  linear and norm parameters inside repeated blocks (Mixture-of-Transformers)
- "mom":  linear parameters inside repeated blocks (Mixture-of-Mamba: in/x/dt/out_proj)
- "auto": per block, "mot" where the block computes attention (SDPA, or a softmax over a dim as long
          as the sequence: attention over keys), else "mom". A softmax over a fixed-size dim (a
          mixture-of-experts router) is not attention.
- "all":  every parameter whose every use can be routed
- "none": nothing (use `include` alone)
Then `include` regexes add parameters and `exclude` regexes remove them (re.search on the FQN).
Embeddings, the final norm and the LM head sit outside the repeated blocks and stay shared.
A model without repeated blocks (a bare mixer or layer) counts as one block.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field

import sympy
import torch

from sparsify.capture import CapturedGraph
from sparsify.errors import SparsifyError, describe_node
from sparsify.ops.spec import shared_by_default_kinds
from sparsify.passes.param_uses import find_param_uses
from sparsify.passes.token_axes import size_exprs

POLICIES = ("auto", "mot", "mom", "all", "none")
INIT_MODES = ("copy", "independent")
ROUTABLE_ROLES = ("linear", "norm", "conv", "elementwise")
# Ops that mark a block as an attention block for policy="auto" (softmaxes only over the sequence).
SDPA_OPS = {torch.ops.aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {torch.ops.aten._softmax.default, torch.ops.aten.softmax.int, torch.ops.aten._safe_softmax.default}


@dataclass
class PlannedParam:
    fqn: str
    role: str                       # linear | norm | conv | elementwise | embedding | unsupported | unused
    shape: list[int]                # dense shape; routed shape is [modalities, *shape]
    uses: list[str] = field(default_factory=list)  # one line per use: op and token dims
    aliases: list[str] = field(default_factory=list)  # other FQNs of the same tensor (tied weights)
    reason: str = ""                # why a shared parameter is shared


@dataclass
class RoutingPlan:
    modalities: int
    init: str = "copy"
    policy: str = "auto"
    include: str | None = None
    exclude: str | None = None
    params: list[PlannedParam] = field(default_factory=list)   # routed
    shared: list[PlannedParam] = field(default_factory=list)   # kept as they are
    notes: list[str] = field(default_factory=list)             # what a user should know (half-routed blocks)

    @property
    def routed(self) -> list[str]:
        """FQNs of routed parameters, tied aliases included."""
        return [name for p in self.params for name in [p.fqn, *p.aliases]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingPlan":
        try:
            params = [PlannedParam(**p) for p in data.get("params", [])]
            shared = [PlannedParam(**p) for p in data.get("shared", [])]
            fields = {k: data[k] for k in ("modalities", "init", "policy", "include", "exclude", "notes") if k in data}
            return cls(params=params, shared=shared, **fields)
        except (TypeError, KeyError) as e:
            raise SparsifyError(f"not a valid RoutingPlan: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RoutingPlan":
        return cls.from_dict(json.loads(text))

    def parameter_counts(self) -> tuple[int, int]:
        """(elements of the routed parameters' dense shapes, elements of the shared parameters)."""
        return (sum(math.prod(p.shape) for p in self.params), sum(math.prod(p.shape) for p in self.shared))

    def summary(self) -> str:
        rows = [("parameter", "role", "dense shape", "routed shape", "uses")]
        for p in self.params:
            rows.append((p.fqn, p.role, str(p.shape), str([self.modalities, *p.shape]), "; ".join(p.uses)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"RoutingPlan: {self.modalities} modalities, policy={self.policy}, init={self.init}"
                 + (f", include={self.include!r}" if self.include else "")
                 + (f", exclude={self.exclude!r}" if self.exclude else "")]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        dense_routed, dense_shared = self.parameter_counts()
        total_dense = dense_routed + dense_shared
        total_routed = dense_routed * self.modalities + dense_shared
        lines.append(f"shared ({len(self.shared)}): " + ", ".join(f"{p.fqn} [{p.reason}]" for p in self.shared))
        lines.append(
            f"parameters: dense {total_dense:,} -> routed {total_routed:,} "
            f"({total_routed / max(total_dense, 1):.2f}x); routed tensors {len(self.params)} of "
            f"{len(self.params) + len(self.shared)}"
        )
        # A token uses one copy of each routed tensor: what it touches, and so its compute, is the dense model's.
        linear_routed = sum(math.prod(p.shape) for p in self.params if p.role == "linear")
        linear_shared = sum(math.prod(p.shape) for p in self.shared if p.role == "linear")
        lines.append(
            f"per modality: {dense_routed:,} routed parameters of its own + {dense_shared:,} shared = {total_dense:,} "
            f"used per token (the dense count); compute per token unchanged by routing: "
            f"~{2 * (linear_routed + linear_shared):,} FLOPs in linear layers (2 x their weights), as dense")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _block_of(fqn: str) -> str | None:
    """The repeated block a parameter lives in: FQN up to its first numeric component (layers.3)."""
    parts = fqn.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


ROOT_BLOCK = "<root>"  # a model with no repeated blocks (one bare mixer or layer) is one block


def _is_attention(node: torch.fx.Node, seq) -> bool:
    """SDPA, or a softmax whose dim has the sequence's length (symbolic, or the capture's length where
    export specialised it). Keys are the sequence; a router's experts are a fixed number."""
    if node.op != "call_function":
        return False
    if node.target in SDPA_OPS:
        return True
    if node.target not in SOFTMAX_OPS or not isinstance(node.args[0], torch.fx.Node):
        return False
    value = node.args[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    size = size_exprs(value)[node.args[1] % value.dim()]
    if isinstance(seq, sympy.Expr):
        return isinstance(size, sympy.Expr) and bool(size.free_symbols & seq.free_symbols)
    return size == seq


def _attention_blocks(captured: CapturedGraph, has_blocks: bool) -> set[str]:
    """Repeated blocks whose forward contains an attention op."""
    blocks = set()
    seq = captured.token_dims[1]
    for node in captured.graph_module.graph.nodes:
        if _is_attention(node, seq):
            if not has_blocks:
                blocks.add(ROOT_BLOCK)
            for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
                block = _block_of(fqn + ".x")
                if block:
                    blocks.add(block)
    return blocks


def _role(uses) -> tuple[str, str]:
    """(role, problem) of a parameter: its routable role if any use has one, and the first use's problem.

    A linear weight with one odd use keeps the role "linear": a preset picks it, and the
    route pass then reports the odd use (node, module, source line) instead of silently sharing it.
    """
    if not uses:
        return "unused", "not used by the captured forward"
    problem = next((u.problem for u in uses if u.problem), "")
    roles = {u.role for u in uses if not u.problem}
    for role in ROUTABLE_ROLES:
        if role in roles:
            return role, problem
    return uses[0].role, problem


def _selected(policy: str, role: str, block: str | None, attention_blocks: set[str], routable: bool) -> bool:
    if policy == "none" or role not in ROUTABLE_ROLES:
        return False
    if policy == "all":
        return routable
    if block is None:
        return False
    if policy == "mom" or (policy == "auto" and block not in attention_blocks):
        return role == "linear"
    return role in ("linear", "norm")


def _compile(pattern, what):
    """A regex, or a list of them (as PEFT's target_modules) meaning any of them."""
    if pattern is None:
        return None
    if isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern):
        pattern = "|".join(f"(?:{p})" for p in pattern)
    if not isinstance(pattern, str):
        raise SparsifyError(f"{what}= takes a regular expression or a list of them, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SparsifyError(f"{what}={pattern!r} is not a valid regular expression: {e}") from None


def _closest_fqns(pattern: str, fqns: list[str], count: int = 5) -> list[str]:
    """The parameter FQNs most like a regex that matched none (its metacharacters dropped)."""
    text = re.sub(r"\\.|[\^$*+?()\[\]{}|]", lambda m: m.group(0)[1:] if len(m.group(0)) == 2 else "", pattern)
    score = {f: difflib.SequenceMatcher(None, text, f).find_longest_match().size for f in fqns}
    return sorted(fqns, key=lambda f: (-score[f], len(f), f))[:count]


def _check_matches(pattern, compiled, what: str, fqns: list[str]) -> None:
    """PEFT users' most common complaint is a target that silently matched nothing: here it is an error."""
    if compiled is not None and not any(compiled.search(f) for f in fqns):
        raise SparsifyError(
            f"{what}={pattern!r} matches no parameter (re.search on parameter FQNs). Closest FQNs: "
            + ", ".join(_closest_fqns(pattern, fqns)) + ". List them all with [n for n, _ in model.named_parameters()]."
        )


def build_plan(
    captured: CapturedGraph,
    module: torch.nn.Module,
    modalities: int,
    policy: str = "auto",
    include: str | None = None,
    exclude: str | None = None,
    init: str = "copy",
) -> RoutingPlan:
    """Plan routing for a captured dense module (the plan pass: analysis only, the graph is unchanged)."""
    if not isinstance(modalities, int) or isinstance(modalities, bool) or modalities < 1:
        raise SparsifyError(f"modalities must be a positive int (e.g. 3 for text, image, speech), got {modalities!r}")
    if policy not in POLICIES:
        raise SparsifyError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if init not in INIT_MODES:
        raise SparsifyError(f"unknown init {init!r}; choose 'copy' (equal to dense at init) or 'independent'")
    include_re, exclude_re = _compile(include, "include"), _compile(exclude, "exclude")

    # Tied weights are one tensor under several FQNs: plan them once, under the first name.
    names_of: dict[int, list[str]] = {}
    for fqn, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(fqn)
    canonical = {fqn: names[0] for names in names_of.values() for fqn in names}
    _check_matches(include, include_re, "include", list(canonical))
    _check_matches(exclude, exclude_re, "exclude", list(canonical))

    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    param_nodes = {n: canonical.get(t, t) for n, (kind, t) in zip(placeholders, captured.placeholders)
                   if kind == "parameter"}
    # Analysed once: route reuses this for the same graph (captured.param_uses).
    captured.param_uses = find_param_uses(captured.graph_module, list(param_nodes), captured.token_dims,
                                          captured.user_input_nodes())
    uses = {param_nodes[node]: node_uses for node, node_uses in captured.param_uses.items()}
    has_blocks = any(_block_of(fqn) for names in names_of.values() for fqn in names)
    shared_kinds = shared_by_default_kinds()
    attention_blocks = _attention_blocks(captured, has_blocks)

    plan = RoutingPlan(modalities=modalities, init=init, policy=policy, include=include, exclude=exclude)
    unroutable_shared: list[str] = []
    for names in names_of.values():
        fqn = names[0]
        param_uses = uses.get(fqn, [])
        role, reason = _role(param_uses)
        routable = not reason
        block = _block_of(fqn) if has_blocks else ROOT_BLOCK
        pick = _selected(policy, role, block, attention_blocks, routable)
        if any(u.kind in shared_kinds for u in param_uses):
            # No preset routes these; include= does (and route then names any use it cannot route).
            pick, reason = False, "an embedding table: shared under every policy; include= routes it"
        included = bool(include_re and any(include_re.search(n) for n in names))
        if included:
            pick = True
        if exclude_re and any(exclude_re.search(n) for n in names):
            pick, reason = False, reason or f"excluded by {exclude!r}"
        if pick and not included and all(u.problem or u.token_free for u in param_uses):
            # A preset picks by role; a parameter none of whose uses has tokens to route by (it acts on windows
            # or pools of several tokens, a state before the first token) has no modality to take a copy by.
            # Left shared and said (a note, a warning at convert). One routable use among odd ones is still
            # picked, and route names the odd use; include= still picks it, and route refuses it.
            pick, reason = False, ("no use of it can be routed per token "
                                   f"({reason or 'it acts only on values no input token went into'})")
            unroutable_shared.append(fqn)
        entry = PlannedParam(fqn=fqn, role=role, shape=list(module.get_parameter(fqn).shape),
                             uses=[u.describe() for u in param_uses], aliases=names[1:])
        if pick:
            plan.params.append(entry)
        else:
            entry.reason = reason or ("outside the repeated blocks" if block is None
                                      else f"not selected by policy={policy!r}")
            plan.shared.append(entry)
    def block_of(fqn):
        return _block_of(fqn) if has_blocks else ROOT_BLOCK

    routed_blocks = {block_of(p.fqn) for p in plan.params}
    plan.notes = _norm_notes({p.fqn: uses.get(p.fqn, []) for p in plan.params}) + [
        f"block {block_of(p.fqn)} is routed but its norm parameter {p.fqn} stays shared ({p.reason})"
        for p in plan.shared if p.role == "norm" and block_of(p.fqn) in routed_blocks
        and _selected(policy, "norm", block_of(p.fqn), attention_blocks, True)]
    if unroutable_shared:
        plan.notes.append(f"{len(unroutable_shared)} parameters policy={policy!r} would route stay shared: none of "
                          f"their uses has tokens to route by ({', '.join(unroutable_shared[:4])}"
                          f"{', ...' if len(unroutable_shared) > 4 else ''}; the summary gives each one's reason)")
    return plan


def _norm_notes(uses: dict) -> list[str]:
    """Routed norms no pattern recognised: routed exactly (as a per-token scale), but the user should know."""
    return [f"{fqn}: scales a normalised value in a form no norm pattern matches ({describe_node(use.node)}); "
            "it is routed as a plain per-token scale, not a fused norm"
            for fqn, param_uses in uses.items() for use in param_uses if use.kind == "norm_like_scale"]
