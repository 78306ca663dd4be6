"""RoutedModel: the nn.Module a conversion returns.

It owns the dense model's module tree, with each routed parameter replaced by a
stacked [M, *S] parameter under the same FQN, and runs captured-and-routed
graphs, split per module so each dense module runs its own routed subgraph
(module_tree.py). A graph is valid for one
train/eval mode, one dtype/device, one autocast state and one input structure,
for the shapes export kept dynamic, and while what the dense forward read at
capture still holds (forward_state.py); other calls capture again (cached),
binding the same parameters, the way torch.compile recompiles.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from sparsify import forward_state, modality_split, module_tree, sharding
from sparsify.capture import CapturedGraph, bind_call, capture, primary_tensor
from sparsify.errors import CaptureError, SparsifyError
from sparsify.frontends import CACHE_ARGS
from sparsify.ops import check_modality_ids
from sparsify.ops._grouping import owned
from sparsify.passes import run_passes
from sparsify.passes.direct_calls import direct_calls
from sparsify.passes.pipeline import RoutingContext, routing_passes
from sparsify.passes.route import MODALITY_IDS
from sparsify.plan import RoutingPlan


@dataclass
class GraphEntry:
    routed: CapturedGraph              # graph_module routed; last placeholder is modality_ids
    dense_graph_module: torch.fx.GraphModule | None  # the same capture before routing, for verify (None: eager_only)
    # The routed graph split per module (module_tree.py): {module FQN ("" = root): forward code}. None
    # where the split is not possible; the flat graph then runs and `tree_problem` says why.
    module_forwards: dict | None = None
    tag: str = ""                      # names this graph in each module's runs (module_tree.add_runs)
    tree_problem: str | None = None
    # For a graph only ever run as it is (route_captured's eager_only): the routed graph with direct op calls.
    direct: torch.fx.GraphModule | None = None


class ForwardWithSignature:
    """RoutedModel.forward bound to one routed model, with the signature of its dense model's forward plus
    `modality_ids` (a bound method's signature is its class function's, the same for every dense model)."""

    def __init__(self, routed: "RoutedModel"):
        self.routed = routed

    def __call__(self, *args, **kwargs):
        return RoutedModel.forward(self.routed, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        dense = inspect.signature(self.routed._dense.forward)
        params = [p for p in dense.parameters.values() if p.name != MODALITY_IDS]
        ids = inspect.Parameter(MODALITY_IDS, inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        return dense.replace(parameters=params[:at] + [ids] + params[at:])


# Tensor parallelism (tensor_parallel.py): the mesh a routed model's linears are split over, kept in its __dict__,
# and the attribute marking the Parameters parallelize_module made (FSDP2 replaces them with its own)
TENSOR_PARALLEL_MESH = "_tensor_parallel_mesh"
SPLIT_MARK = "_sparsify_tensor_parallel"


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"  # by name: torch.distributed may be absent from the build


def _is_sharded(param) -> bool:
    """Sharded by FSDP2: a DTensor other than a routed linear's tensor-parallel split as parallelize_module
    left it (graphs are captured on those: dense_view gives their per-rank part)."""
    return _is_dtensor(param) and not getattr(param, SPLIT_MARK, False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor-parallel split parameter (tensor_parallel.py); any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


class RoutedModel(nn.Module):
    def __init__(self, dense: nn.Module, plan: RoutingPlan, call_defaults: dict[str, Any] | None = None):
        super().__init__()
        # Share the dense root's registries instead of nesting it, so parameter FQNs,
        # state_dict keys and get_parameter() names are exactly the dense model's.
        self._modules = dense._modules
        self._parameters = dense._parameters
        self._buffers = dense._buffers
        self._non_persistent_buffers_set = dense._non_persistent_buffers_set
        self.training = dense.training
        object.__setattr__(self, "_dense", dense)
        self.plan = plan
        self.call_defaults = dict(call_defaults or {})
        # Implementation of the routed ops: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        self.backend = "auto"
        # Sort tokens by modality once per token-wise region of a block (passes/hoist.py) rather than in
        # every routed op. Part of the graph cache key: changing it routes new graphs on the next call.
        self.hoist = True
        # Check every forward that modality ids lie in [0, M): one host sync. A GPU training loop that
        # builds its ids itself may turn it off; an id out of range then fails inside a kernel instead.
        self.check_id_range = True
        self._graphs: dict[tuple, list[GraphEntry]] = {}
        # What inspect.signature(routed.forward) says: the dense forward's parameters and modality_ids (tools
        # that pick a batch's fields by the signature, as Hugging Face's Trainer, keep the right ones).
        self.forward = ForwardWithSignature(self)
        # The module owning each routed parameter, by the path the plan names it under: a tool that wraps a
        # module after conversion (PEFT's LoRA layer holds the linear as `base_layer`) moves the parameter to
        # another FQN, and routed_fqns() finds it there.
        self._routed_owners = {owner: dense.get_submodule(owner)
                               for owner in {fqn.rpartition(".")[0] for fqn in plan.routed}}
        # Modalities whose copies take no gradient (freeze / unfreeze). Freezing, or learning rates per modality,
        # give each routed parameter one tensor per modality (modality_split.py); state dicts keep the stacked form.
        self.__dict__["_split"] = False
        self._register_state_dict_hook(modality_split.stacked_state_dict_hook)
        self._register_load_state_dict_pre_hook(modality_split.split_load_pre_hook, with_module=True)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Attributes of the dense root (e.g. a Hugging Face `config`) stay reachable.
            dense = self.__dict__.get("_dense")
            if dense is None:
                raise
            return getattr(dense, name)

    def __getstate__(self):
        """Pickled (torch.save(routed)) without its graphs: code generated at capture does not pickle, and the
        unpickled model captures again at its first call. sparsify.save writes a smaller, code-free checkpoint."""
        if modality_split.is_split(self):  # torch's parametrize refuses to pickle (modality_split.py)
            raise SparsifyError("this routed model holds per-modality copies (freeze / param_groups), which torch's "
                                "parametrize cannot pickle: save it with sparsify.save(routed, path) (frozen "
                                "modalities included) or torch.save(routed.state_dict(), path)")
        state = dict(self.__dict__)
        state["_graphs"] = {}
        state.pop("_running", None)
        return state

    def extra_repr(self) -> str:
        return f"modalities={self.plan.modalities}, routed={len(self.plan.params)} parameters"

    # -- modalities that train ------------------------------------------------------------------
    @property
    def frozen_modalities(self) -> list[int]:
        """The modalities whose copies take no gradient (freeze / unfreeze; recorded by sparsify.save)."""
        return modality_split.frozen_modalities(self)

    def freeze(self, modalities) -> "RoutedModel":
        """Freeze modality `modalities`' (an int or a list) copies of every routed parameter: they take no
        gradient (the routed linear skips their weight-gradient GEMMs), so no optimizer moves them or keeps state
        for them. The first call gives each routed parameter one tensor per modality (modality_split.py): build
        the optimizer after it, and before fully_shard. Shared parameters are untouched (requires_grad_ them)."""
        modality_split.set_frozen(self, modalities, frozen=True)
        return self

    def unfreeze(self, modalities) -> "RoutedModel":
        """Let modality `modalities`' copies train again (see freeze)."""
        modality_split.set_frozen(self, modalities, frozen=False)
        return self

    def param_groups(self, lr: dict | None = None, **group_options) -> list[dict]:
        """Parameter groups for a torch optimizer, one per trainable modality and one for the shared parameters:
        `torch.optim.AdamW(routed.param_groups(lr={0: 1e-5, 1: 3e-4, "shared": 1e-4}), lr=1e-4)`. Modalities
        (and "shared") missing from `lr` take the optimizer's default; frozen copies are in no group. Splits the
        model (see freeze)."""
        return modality_split.param_groups(self, lr, **group_options)

    def get_parameter(self, target: str) -> torch.Tensor:
        """nn.Module.get_parameter, but a routed parameter of a split model (freeze, param_groups) is its [M, *S]
        stack of the per-modality copies, as the routed graphs read it."""
        return modality_split.parameter_at(self, target) if modality_split.is_split(self) else \
            super().get_parameter(target)

    # -- calling ---------------------------------------------------------------------------
    def bind_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Inputs as keywords in forward-signature order, with capture-time defaults (use_cache=False)."""
        inputs = bind_call(self._dense, args, kwargs)
        missing = {k: v for k, v in self.call_defaults.items() if k not in inputs}
        return bind_call(self._dense, (), {**inputs, **missing}) if missing else inputs

    def __call__(self, *args, **kwargs):
        # Before the call's hooks: FSDP2's pre-forward hook shows the parameters unsharded, not their placement.
        if not self.__dict__.get("_placement_checked") and self._stacked_sharded():
            self.__dict__["_placement_checked"] = True
            sharding.check_placements(self)
        return super().__call__(*args, **kwargs)

    def forward(self, *args, modality_ids=None, **kwargs):
        if modality_ids is None:
            raise SparsifyError(
                "modality_ids is required: pass modality_ids=LongTensor[batch, seq] with one id in "
                f"[0, {self.plan.modalities}) per token, e.g. routed(input_ids, modality_ids=ids)."
            )
        inputs = self.bind_inputs(args, kwargs)
        if inputs.get("use_cache") is True or any(inputs.get(name) is not None for name in CACHE_ARGS):
            raise SparsifyError(
                "a routed model's forward takes no cache (use_cache=True, past_key_values=, cache_params=): the "
                "cache lives inside the routed graphs that routed.generate(input_ids, modality_ids=..., "
                "next_modality=...) runs, and a cache object made by another model cannot be used. Call "
                "routed(...) with use_cache=False for training and scoring, routed.generate(...) to decode.")
        token = primary_tensor(inputs)
        # The range check syncs with the host: off the compiled path (torch.compile would break the graph
        # there); a compiled training loop checks its ids where it makes them.
        check_range = self.check_id_range and not torch.compiler.is_compiling()
        ids = owned(check_modality_ids(modality_ids, token.shape[:2], self.plan.modalities,
                                       check_range=check_range).to(token.device))
        entry, flat = self.graph_for(inputs)
        graph = entry.routed
        if entry.module_forwards is None:
            outputs = graph.graph_module(*self.graph_args(graph, flat), ids)
            return self.unpack_outputs(graph, outputs)
        # Kept after the call: activation checkpointing re-runs blocks during backward.
        self.__dict__["_running"] = entry
        user_inputs = [flat[target] for kind, target in graph.placeholders if kind == "input"]
        outputs = entry.module_forwards[""](self, *user_inputs, ids)
        return pytree.tree_unflatten(list(outputs), graph.output_spec)

    def generate(self, input_ids: torch.Tensor, modality_ids: torch.Tensor | None = None, next_modality=0,
                 **generation_kwargs) -> torch.Tensor:
        """Hugging Face `generate` on the routed model, with the model's cache inside the routed graphs.

        `modality_ids`: LongTensor[batch, prompt_len], the prompt's modalities. `next_modality` gives each new
        token's modality: an int, a mapping {range(start, stop) or (start, stop): modality, "default": m} over
        token ids, or a callable (new_token_ids [batch], ids_so_far [batch, len]) -> LongTensor [batch].
        Every other keyword is Hugging Face's (max_new_tokens, do_sample, attention_mask, ...).
        """
        from sparsify.generation import generate
        return generate(self, input_ids, modality_ids, next_modality, **generation_kwargs)

    def precapture(self, *args, param_dtype: torch.dtype | None = None, **kwargs) -> None:
        """Capture and cache the graph a call like this one needs, now: before `fully_shard` (export
        cannot capture sharded parameters). `param_dtype` is the dtype a FSDP2 MixedPrecisionPolicy will
        give the parameters in forward (buffers keep theirs, as under FSDP2); the model is left as it was.
        The graph is keyed by the state around this call (train/eval, autocast, config flags: see
        forward_state.py), so precapture in the state you will train in; nothing runs but the capture."""
        kwargs.pop("modality_ids", None)  # the graph's key does not depend on the ids' values
        saved = [(p, p.data) for p in self.parameters()] if param_dtype is not None else []
        try:
            for param, data in saved:
                param.data = data.to(param_dtype)
            self.graph_for(self.bind_inputs(args, kwargs))
        finally:
            for param, data in saved:
                param.data = data

    def graph_args(self, graph: CapturedGraph, flat_inputs: list, params: dict | None = None,
                   owner: nn.Module | None = None) -> list:
        """Placeholder values in order; `params` overrides parameters by FQN (verify uses it); `owner` is the
        module the graph was captured from where that is not this model (a decoding step holding its cache)."""
        owner = owner or self
        values = []
        for kind, target in graph.placeholders:
            if kind == "parameter":
                values.append(params[target] if params and target in params else
                              modality_split.parameter_at(owner, target))
            elif kind == "buffer":
                values.append(owner.get_buffer(target))
            elif kind == "constant":
                values.append(graph.constants[target])
            else:
                values.append(flat_inputs[target])
        return values

    def unpack_outputs(self, graph: CapturedGraph, outputs, buffers: list | None = None):
        """The graph's outputs as the model returns them, after writing its buffer updates back. `buffers`: the
        tensors of graph.mutated_buffers where the caller looked them up already (a decoding step, per token)."""
        outputs = list(outputs)
        if buffers is None:
            buffers = [self.get_buffer(name) for name in graph.mutated_buffers]
        with torch.no_grad():
            for buffer, value in zip(buffers, outputs):
                if value is not buffer and value.data_ptr() != buffer.data_ptr():  # not updated in place already
                    buffer.copy_(value)                                           # (direct_calls)
        return pytree.tree_unflatten(outputs[len(buffers):], graph.output_spec)

    # -- capture cache ---------------------------------------------------------------------
    def forget_graphs(self) -> None:
        """Drop every captured graph (the parameters changed in a way graphs bake in): the next call captures."""
        self._graphs.clear()
        self.__dict__.pop("_running", None)
        module_tree.forget_runs(self)

    def _cache_key(self, flat: list, spec, step: nn.Module | None = None) -> tuple:
        leaves = tuple(
            ("tensor", leaf.dtype, leaf.device, leaf.dim()) if isinstance(leaf, torch.Tensor) else ("value", repr(leaf))
            for leaf in flat
        )
        # Parameters FSDP2 keeps sharded (DTensors) are left out: they run as the unsharded parameters
        # the root shows, in the compute dtype of a MixedPrecisionPolicy.
        params = frozenset((p.dtype, p.device) for p in self.parameters() if not _is_sharded(p))
        # A decoding step's graphs (generation.py) are keyed by the shapes of the cache they hold.
        cache = step.cache_signature() if step is not None else None
        return (self.training, self.backend, self.hoist, str(spec), leaves, params, forward_state.ambient_state(),
                cache)

    def graph_for(self, inputs: dict[str, Any], step: nn.Module | None = None) -> tuple[GraphEntry, list]:
        """The routed graph for these inputs, capturing and routing a new one if none accepts them. `step`: a
        decoding step module (generation.py) to capture instead of the dense model."""
        flat, spec = pytree.tree_flatten(((), inputs))
        key = self._cache_key(flat, spec, step)
        for entry in self._graphs.get(key, ()):
            if entry.routed.accepts(flat) and entry.routed.state.guards.holds():
                return entry, flat
        return self._new_graph(key, inputs, step), flat

    @torch.compiler.disable
    def _new_graph(self, key: tuple, inputs: dict[str, Any], step: nn.Module | None) -> GraphEntry:
        """Capture, route and cache a graph. Never compiled: under torch.compile the call graph-breaks here
        once, the capture runs eagerly, and the recompiled frame finds the graph cached."""
        entry = self._capture(inputs, step)
        self._graphs.setdefault(key, []).append(entry)
        return entry

    @property
    def tensor_parallel_mesh(self):
        """The 1-D device mesh sparsify.parallelize_module split this model's routed linears over, or None."""
        return self.__dict__.get(TENSOR_PARALLEL_MESH)

    def _stacked_sharded(self) -> bool:
        """Whether a stacked parameter is sharded (FSDP2) now: one looked at, the one every plan has first."""
        fqn = next(iter(self.plan.routed), None)
        if fqn is None:
            return False
        owner, _, name = fqn.rpartition(".")
        module = self._routed_owners[owner]
        if modality_split.is_split(self):
            return _is_sharded(module.parametrizations[name].original0)
        return _is_sharded(module._parameters.get(name))

    def routed_fqns(self) -> dict[str, str]:
        """{FQN in the plan: the FQN that parameter has in the module tree now}."""
        paths: dict[int, str] = {}
        for path, module in self.named_modules(remove_duplicate=False):
            paths.setdefault(id(module), path)
        out = {}
        for fqn in self.plan.routed:
            owner, _, name = fqn.rpartition(".")
            path = paths.get(id(self._routed_owners.get(owner)), owner)
            out[fqn] = f"{path}.{name}" if path else name
        return out

    @contextmanager
    def dense_view(self, modality: int = 0):
        """Temporarily give each routed parameter its dense shape (a view of one modality's copy)."""
        if modality_split.is_split(self):
            with modality_split.dense_view(self, modality):
                yield
            return
        views: dict[int, nn.Parameter] = {}
        swapped = []
        for fqn in self.routed_fqns().values():
            owner_name, _, name = fqn.rpartition(".")
            owner = self.get_submodule(owner_name)
            stacked = owner._parameters[name]
            if id(stacked) not in views:  # tied aliases keep sharing one tensor
                views[id(stacked)] = nn.Parameter(_local(stacked).detach()[modality],
                                                  requires_grad=stacked.requires_grad)
            owner._parameters[name] = views[id(stacked)]
            swapped.append((owner, name, stacked))
        try:
            yield
        finally:
            for owner, name, stacked in reversed(swapped):
                owner._parameters[name] = stacked

    def _capture(self, inputs: dict[str, Any], step: nn.Module | None = None) -> GraphEntry:
        sharded = [name for name, p in self.named_parameters() if _is_sharded(p)]
        if sharded:
            changed = [c for entries in self._graphs.values() for e in entries
                       for c in e.routed.state.guards.changed()][:3]
            raise SparsifyError(
                "this call needs a new graph (a new shape class, mode, dtype, autocast or input structure"
                + (f"; or state the forward reads changed since capture: {'; '.join(changed)}" if changed else "")
                + f"), but parameters are sharded (e.g. {sharded[0]}: FSDP2), and torch.export cannot capture "
                "sharded parameters. Before fully_shard, capture each mode, shape class and autocast state you train "
                "with: routed.train(); routed.precapture(batch, modality_ids=ids, param_dtype=<your "
                "MixedPrecisionPolicy's or None>), inside the same torch.autocast if you use one.")
        self._dense.training = self.training  # children share the flag already; the root does not
        with self.dense_forwards():
            try:
                if step is None:
                    captured = capture(self._dense, inputs)
                else:  # the step prepares its cache (dense forwards) and is captured in the state that leaves
                    with step.prepared():  # guarded on what the model read, not on the step's per-call cache
                        captured = capture(step, inputs, every_dim=True, state_of=self._dense)
            except CaptureError as e:
                mesh = self.tensor_parallel_mesh
                if mesh is None:
                    raise
                raise CaptureError(
                    f"{e}\nThe routed linears are split over {mesh.size()} tensor-parallel ranks "
                    "(sparsify.parallelize_module), so the forward was captured on this rank's shards: each "
                    f"column-wise linear gives 1/{mesh.size()} of its features. A forward that writes a head count "
                    "into a view (x.view(b, t, n_heads, head_dim)) cannot run on them; size heads from the input "
                    "(x.view(b, t, -1, head_dim)), as transformers' models do for their tp_plan, or leave those "
                    "linears out of the plan.") from e
        return self.route_captured(captured, eager_only=step is not None)

    @contextmanager
    def dense_forwards(self):
        """Every module runs its dense forward, with modality 0's copy of each routed weight: what export
        traces, and what fills a cache before capture (generation.py). Re-entrant: inside, it does nothing."""
        if self.__dict__.get("_capturing"):
            yield
            return
        self.__dict__["_capturing"] = True  # routed_forward (module_tree.py) then calls the class's forward
        try:
            with self.dense_view(), module_tree.without_wrappers(self):
                yield
        finally:
            self.__dict__["_capturing"] = False

    def route_captured(self, captured: CapturedGraph, eager_only: bool = False) -> GraphEntry:
        """Route and lower a captured graph. `eager_only`: a graph only ever run as it is (a decoding step):
        not split per module (nothing hooks or shards modules while generating), not verified or exported
        (so neither a dense copy nor the ExportedProgram, whose state_dict holds the scratch cache it was
        traced with, is kept), and run with direct op calls."""
        dense_graph_module = None if eager_only else copy.deepcopy(captured.graph_module)
        placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
        param_fqns = {n.name: t for n, (k, t) in zip(placeholders, captured.placeholders) if k == "parameter"}
        user_inputs = [n.name for n in captured.user_input_nodes()]

        with module_tree.without_wrappers(self):  # the names the capture saw
            routed_fqns = self.routed_fqns().values()
        context = RoutingContext(
            param_fqns=param_fqns, user_inputs=user_inputs, token_dims=captured.token_dims, uses=captured.param_uses,
            routed=frozenset(routed_fqns), modalities=self.plan.modalities, backend=self.backend,
            device=next(self.parameters()).device, hoist=self.hoist, eager_only=eager_only,
            autocast=any(enabled for _, enabled, _ in forward_state.ambient_state()))
        passes = routing_passes(context)
        captured.graph_module = run_passes(captured.graph_module, passes)
        captured.param_uses = None  # it described the dense graph
        entry = GraphEntry(routed=captured, dense_graph_module=dense_graph_module)
        if eager_only:
            captured.exported = None
            entry.direct = direct_calls(captured.graph_module, len(captured.mutated_buffers),
                                        split_over_ranks=self.tensor_parallel_mesh is not None)
        else:
            self._split_into_modules(entry)
        return entry

    def _split_into_modules(self, entry: GraphEntry) -> None:
        """Give the routed graph the dense module tree (module_tree.py), or say why not and run it flat."""
        tag = str(self.__dict__.get("_split_count", 0))  # names region bodies uniquely per graph
        self.__dict__["_split_count"] = int(tag) + 1
        checkpointed = entry.routed.state.checkpointed if entry.routed.state is not None else {}
        try:
            program = module_tree.routed_program(entry.routed, self._tensor)
            entry.module_forwards = module_tree.module_forwards(program, self, tag, self._summed_gradients(entry))
            entry.tag = tag
            module_tree.add_runs(self, tag, entry.module_forwards, checkpointed)
        except Exception as e:  # unflatten refuses some programs; the flat graph is still exact
            entry.tree_problem = f"{type(e).__name__}: {e}"
            if self.tensor_parallel_mesh is not None:
                raise SparsifyError(
                    f"this routed graph cannot be split per module ({entry.tree_problem}), and tensor parallelism "
                    "(sparsify.parallelize_module) sums some gradients where modules read their parameters; "
                    "run this model without tensor parallelism or report it") from e
            if checkpointed:
                raise SparsifyError(
                    f"the model checkpoints modules ({', '.join(sorted(checkpointed)[:3])}) but this routed graph cannot be "
                    f"split per module ({entry.tree_problem}), so they cannot be recomputed in backward. Disable "
                    "checkpointing (model.gradient_checkpointing_disable()) or report this model.") from e
            warnings.warn(f"sparsify: this routed graph runs as one flat graph, not per module (hooks on "
                          f"submodules, FSDP2 per block and per-block checkpointing need the split): "
                          f"{entry.tree_problem}", stacklevel=3)
            return
        module_tree.install(self, entry.module_forwards)

    def _summed_gradients(self, entry: GraphEntry) -> tuple[set[str], str] | None:
        """Under tensor parallelism: the parameters left whole that the graph applies to a rank's part of
        the features, whose gradients are summed over the tensor-parallel group (tensor_parallel.py)."""
        mesh = self.tensor_parallel_mesh
        if mesh is None:
            return None
        from sparsify import tensor_parallel

        graph = entry.routed.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        fqns = {n.name: target for n, (kind, target) in zip(placeholders, entry.routed.placeholders)
                if kind == "parameter"}
        found = tensor_parallel.parameters_on_split_activations(graph, fqns, tensor_parallel.split_kinds(self))
        return found, mesh.get_group().group_name

    def _tensor(self, fqn: str) -> torch.Tensor:
        """A parameter or buffer by FQN, as a program's state dict holds it: a split routed parameter's stack
        as a Parameter of its values (module_tree.routed_program)."""
        try:
            tensor = modality_split.parameter_at(self, fqn)
            if _is_dtensor(tensor):  # a tensor-parallel split: the graphs were captured on this rank's part
                return nn.Parameter(_local(tensor).detach(), requires_grad=False)
            return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach(), requires_grad=False)
        except AttributeError:
            return self.get_buffer(fqn)

    def seed_graph(self, inputs: dict[str, Any], captured: CapturedGraph) -> None:
        """Cache a graph captured outside (convert captures once for planning and routing)."""
        flat, spec = pytree.tree_flatten(((), inputs))
        self._graphs.setdefault(self._cache_key(flat, spec), []).append(self.route_captured(captured))
