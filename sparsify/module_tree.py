"""Run a routed graph as the dense model's module tree: each module runs its own routed subgraph.

    routed flat graph  =>  ExportedProgram (modality_ids a user input)  =>  torch.export.unflatten
                       =>  each unflattened module's graph, as code bound to the *dense* module of that FQN

The routed model keeps the dense model's modules (its parameters under the dense
FQNs). Each module that the captured forward calls gets an instance `forward` that
runs its routed subgraph for the graph the current call uses, so `module(...)`
fires its hooks, and FSDP2's per-module unsharding, activation checkpointing
wrappers and forward hooks see the module run. The subgraphs read parameters as
`self.<name>` at call time, which is what FSDP2 swaps during a forward. A module
gets its inputs as unflatten gives them: the values flowing into its subgraph,
modality_ids among them where it needs it (hooks see those, not the dense signature).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.export.unflatten import InterpreterModule

from sparsify import forward_state
from sparsify.errors import SparsifyError
from sparsify.ops.eager import eager_form_of
from sparsify.passes.route import MODALITY_IDS

def routed_program(captured, parameters: Callable[[str], torch.Tensor]) -> ExportedProgram:
    """The routed graph of `captured` (routed in place) as an ExportedProgram taking modality_ids last.

    The route pass's self-check left a fake value on every node it created or reshaped (passes/graph_check.py);
    here the signature and the root's call signature gain the modality_ids input.
    """
    exported, graph_module = captured.exported, captured.graph_module
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    missing = [n.name for n in graph_module.graph.nodes if n.op in ("placeholder", "call_function")
               and "val" not in n.meta]
    if missing:
        raise SparsifyError(f"internal: routed graph nodes without example values: {missing[:5]}")
    signature = exported.graph_signature
    ids_spec = InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=placeholders[-1].name), target=None)
    # Routing replaced nodes the signature names (an output that was a dense linear): name today's.
    returned = list(graph_module.graph.output_node().args[0])
    renamed = {spec.arg.name: node.name for spec, node in zip(signature.output_specs, returned)
               if isinstance(spec.arg, TensorArgument) and isinstance(node, torch.fx.Node)}
    output_specs = [dataclasses.replace(spec, arg=TensorArgument(name=renamed[spec.arg.name]))
                    if isinstance(spec.arg, TensorArgument) else spec for spec in signature.output_specs]
    graph_signature = ExportGraphSignature(input_specs=list(signature.input_specs) + [ids_spec],
                                           output_specs=output_specs)
    call_graph = copy.deepcopy(exported.module_call_graph)
    root = call_graph[0].signature
    args, kwargs = pytree.tree_unflatten(list(range(root.in_spec.num_leaves)), root.in_spec)
    in_spec = pytree.tree_flatten((args, {**kwargs, MODALITY_IDS: -1}))[1]
    call_graph[0] = ModuleCallEntry(fqn="", signature=ModuleCallSignature(
        inputs=list(root.inputs) + [TensorArgument(name=placeholders[-1].name)],
        outputs=[TensorArgument(name=renamed.get(a.name, a.name)) if isinstance(a, TensorArgument) else a
                 for a in root.outputs],
        in_spec=in_spec, out_spec=root.out_spec,
        forward_arg_names=list(root.forward_arg_names or []) + [MODALITY_IDS]))
    state_dict = {name: parameters(name) for name in exported.state_dict}
    return ExportedProgram(root=graph_module, graph=graph_module.graph, graph_signature=graph_signature,
                           state_dict=state_dict, range_constraints=exported.range_constraints,
                           module_call_graph=call_graph, example_inputs=None, constants=exported.constants,
                           verifiers=[exported.verifier])


def module_forwards(program: ExportedProgram, owner: nn.Module, tag: str,
                    summed_gradients: tuple[set[str], str] | None = None) -> dict[str, Callable]:
    """{module FQN: forward function(module, *inputs)} for every module the routed program calls.

    Each function is the code of that module's unflattened graph, written against `self`, so bound to
    the dense module of the same FQN in `owner` it reads that module's parameters and calls its
    children; its routed ops are their eager forms (ops/eager.py). Graphs export made for regions
    (autocast, no_grad) are not modules of the dense tree: they are attached to the module under a name
    unique to this graph (`tag`), outside `_modules`. `summed_gradients`: (parameter FQNs, process group
    name): each read of those parameters has its gradient summed over that group (tensor_parallel.py).
    """
    with _repeated_calls_inlined(program):
        unflattened = torch.export.unflatten(program)
    forwards: dict[str, Callable] = {}
    shared: dict[tuple, Callable] = {}  # generated code and the objects it calls by name -> its forward function
    for fqn, module in [("", unflattened), *unflattened.named_modules(remove_duplicate=False)]:
        if fqn and not isinstance(module, InterpreterModule):
            continue  # a region's graph (autocast, no_grad), reached through its parent's code
        if "@" in fqn:
            raise SparsifyError(f"internal: module '{fqn.split('@')[0]}' is called more than once in one forward "
                                "and was not inlined into its parent (_repeated_calls_inlined); please report this "
                                "model")
        target = dense_module(owner, fqn)
        graph = copy.deepcopy(module.graph)
        for node in graph.nodes:
            if node.name == "self":  # a child module named `self` (BERT's attention): its value would shadow
                node._rename("self_output")  # the generated forward's own `self`
            eager = eager_form_of(node.target, node.kwargs) if node.op == "call_function" else None
            if eager is not None:  # run eagerly without the custom op's dispatch; tracers still see the op
                node.target = eager
            if summed_gradients and node.op == "get_attr" and \
                    (f"{fqn}.{node.target}" if fqn else node.target) in summed_gradients[0]:
                _sum_gradient_after(graph, node, summed_gradients[1])
            if node.op in ("get_attr", "call_module") and not _has(target, node.target):
                region = module.get_submodule(node.target) if node.op == "call_module" else \
                    _get(module, node.target)
                unique = f"g{tag}_{node.target.replace('.', '_')}"
                regions = target.__dict__.setdefault(REGIONS, Regions())  # plain attribute: not a submodule
                setattr(regions, unique, region)
                node.target = f"{REGIONS}.{unique}"
        if fqn:  # the root keeps its input names: users call it by keyword
            _local_names_by_position(graph)
        # Only the generated code is kept: bound to the dense module, its `self.<name>` reads resolve there.
        # Modules whose code is the same (the blocks of a model, named by position) share one function, so
        # compiling each block on its own (`block.compile()`, torchtitan's regional compilation) compiles the
        # code once for every such block instead of recompiling per block until dynamo's recompile limit.
        generated = torch.fx.GraphModule(target, graph)
        forward = type(generated).forward
        same_code = (generated.code, tuple((name, id(value)) for name, value in forward.__globals__.items()))
        forwards[fqn] = shared.setdefault(same_code, forward)
    return forwards


def _local_names_by_position(graph: torch.fx.Graph) -> None:
    """Name a subgraph's values by their position (the flat graph's names, unique across the whole model, differ
    from block to block). Its inputs too: a module's subgraph is called by position from its parent's code."""
    for index, node in enumerate(graph.nodes):
        if node.op != "output":
            node._rename(f"_v{index}")
        if node.op == "placeholder":
            node.target = node.name  # the argument's name in the generated code


def _sum_gradient_after(graph: torch.fx.Graph, read: torch.fx.Node, group_name: str) -> None:
    from sparsify.tensor_parallel import sum_gradient

    with graph.inserting_after(read):
        summed = graph.call_function(sum_gradient, (read, group_name))
    read.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)


@contextmanager
def _repeated_calls_inlined(program: ExportedProgram):
    """While unflattening: a module the forward calls more than once with different graphs (a rotary
    embedding called once per attention kind, as Gemma 3's) belongs to its parent, calls and children alike.

    unflatten would give each such call its own copy of the module ('fqn@1', ...), but the routed model's
    modules are the dense ones, one forward each. Inlined, the parent's subgraph computes what the calls did;
    the module's own hooks do not fire (those of its parent and of every other module do)."""
    graph = program.graph_module.graph
    stacks = {node: node.meta.get("nn_module_stack") for node in graph.nodes if node.meta.get("nn_module_stack")}
    repeated = {fqn for stack in stacks.values() for key, (fqn, _) in stack.items() if "@" in key}
    if not repeated:
        yield
        return

    def inside(fqn: str) -> bool:
        return any(fqn == r or fqn.startswith(r + ".") for r in repeated)

    for node, stack in stacks.items():
        kept = {}
        for key, (fqn, kind) in stack.items():
            if inside(fqn):
                break
            kept[key] = (fqn, kind)
        node.meta["nn_module_stack"] = kept
    call_graph = program.module_call_graph
    program._module_call_graph = [entry for entry in call_graph if not inside(entry.fqn.split("@")[0])]
    try:
        yield
    finally:
        for node, stack in stacks.items():
            node.meta["nn_module_stack"] = stack
        program._module_call_graph = call_graph


# Wrappers that PyTorch's tools put around a module (activation checkpointing's CheckpointWrapper) keep
# the wrapped module under this attribute; the routed subgraph belongs to the wrapped module.
WRAPPED = forward_state.CHECKPOINT_WRAPPED


def dense_module(root: nn.Module, fqn: str) -> nn.Module:
    """The module of the dense tree at `fqn`, looking through wrappers added since conversion."""
    module = root.get_submodule(fqn) if fqn else root
    while isinstance(getattr(module, WRAPPED, None), nn.Module):
        module = getattr(module, WRAPPED)
    return module


@contextmanager
def without_wrappers(root: nn.Module):
    """While capturing, the dense tree as it was converted: wrappers replaced by what they wrap, so the
    captured graph has the dense FQNs (those the plan names) and each module its own subgraph."""
    swapped = []
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and isinstance(getattr(child, WRAPPED, None), nn.Module):
                parent._modules[name] = dense_module(child, "")
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


REGIONS = "_sparsify_regions"


class Regions:
    """Where a module keeps the graphs of its regions (autocast, no_grad) for the routed graphs it runs: not
    submodules (not in state_dict, not moved or sharded) and not pickled (graphs are captured again after a
    routed model is unpickled)."""

    def __reduce__(self):
        return Regions, ()


def _has(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
        return True
    except AttributeError:
        return False


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def routed_forward(module: nn.Module, *args: Any, **kwargs: Any):
    """The instance `forward` of a dense module inside a routed model: runs the module's routed subgraph
    for the graph the routed model's current (or last, for activation checkpointing's recomputation)
    call uses. A method bound to the module, so copies and wrappers of the module keep working."""
    root = module.__dict__["_sparsify_root"]
    if root.__dict__.get("_capturing"):  # capturing a new graph traces the dense forward
        return type(module).forward(module, *args, **kwargs)
    entry = root.__dict__.get("_running")
    if entry is None:
        raise SparsifyError(f"module '{module.__dict__['_sparsify_fqn']}' of a routed model runs only inside the "
                            "routed model's forward (its routed subgraph needs the call's modality_ids): call the "
                            "routed model")
    # Kept on the module object, not looked up by path: a tool may have moved the module since (PEFT's LoRA
    # layer holds a linear as `base_layer`). And on each module rather than in one table keyed by module: read
    # relative to the module, it is the same code for every block, which dynamo compiles once for them all.
    run = module.__dict__.get(RUNS, {}).get(entry.tag)
    if run is None:
        raise SparsifyError(f"module '{module.__dict__['_sparsify_fqn']}' is not called by the captured forward of "
                            "the model, so it has no routed subgraph; sparsify runs modules only as the model's "
                            "forward calls them")
    forward, checkpoint = run
    if checkpoint is not None and torch.is_grad_enabled():  # the dense forward checkpointed this module
        return checkpoint.run(functools.partial(forward, module, **kwargs), *args)
    return forward(module, *args, **kwargs)


RUNS = "_sparsify_runs"  # a module's __dict__ key: {graph tag: (forward, checkpoint)}, see add_runs


def add_runs(root: nn.Module, tag: str, forwards: dict[str, Callable], checkpointed: dict) -> None:
    """Give each module of `forwards` (by FQN, "" the root aside) its forward in the graph `tag`, with the
    checkpoint the dense forward ran it under (forward_state.CheckpointUse) or None."""
    for fqn, forward in forwards.items():
        if fqn:
            module = dense_module(root, fqn)
            module.__dict__.setdefault(RUNS, {})[tag] = (forward, checkpointed.get(fqn))


def forget_runs(root: nn.Module) -> None:
    """Drop every module's forwards (the routed model dropped its graphs)."""
    for module in root.modules():
        module.__dict__.pop(RUNS, None)


def install(routed: nn.Module, fqns) -> None:
    """Give each module named in `fqns` (once) the forward that runs its routed subgraph. The module keeps a
    plain reference to the routed root (in its __dict__: not a submodule), which deepcopy follows."""
    for fqn in fqns:
        if not fqn:
            continue
        module = dense_module(routed, fqn)
        if module.__dict__.get("_sparsify_root") is not routed or \
                not isinstance(module.__dict__.get("forward"), types.FunctionType):
            module.__dict__["_sparsify_root"] = routed
            module.__dict__["_sparsify_fqn"] = fqn
            module.forward = _forward_of(module)
            module.__dict__["__getstate__"] = functools.partial(_picklable_state, module)


def _forward_of(module: nn.Module) -> Callable:
    """routed_forward bound to `module`, as a closure: dynamo guards a module's own `forward` that is a plain
    function by its code alone, the same for every module, so the blocks of a model compiled one by one
    (`block.compile()`) share their compiled code. (A callable object or a partial per module is guarded by
    its identity: a recompile per block, and after dynamo's recompile limit (8) the other blocks run eager.)"""
    def forward(*args: Any, **kwargs: Any):
        return routed_forward(module, *args, **kwargs)
    return forward


def _picklable_state(module: nn.Module) -> dict:
    """A routed module's pickled or deep-copied state (its instance `__getstate__`): without its runs (generated
    code: the copy captures its graphs again), and the closure, which pickle cannot save and deepcopy would
    share with the original module, as a RoutedForward of the module, which both follow to the copy; `install`
    turns it back into a closure when the copy's graphs are captured."""
    state = nn.Module.__getstate__(module)
    for key in ("__getstate__", RUNS):
        state.pop(key, None)
    state["forward"] = RoutedForward(module)
    return state


class RoutedForward:
    """routed_forward bound to a module, in the form pickle and deepcopy follow (see _picklable_state)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any):
        return routed_forward(self.module, *args, **kwargs)
