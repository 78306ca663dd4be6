"""Generation: `routed.generate(input_ids, modality_ids=..., next_modality=..., **hf_generation_kwargs)`.

Hugging Face's `generate` drives the loop (logits processors, sampling, stopping, left padding); the model's
forward it calls is replaced, for the call, by one that runs a routed graph:

    with a cache      DecodingStep = dense forward + the cache's tensors as buffers  =>  captured, routed:
                      one prefill graph and one decode graph per (batch, cache length, dtype) class;
                      the graph mutates the cache buffers in place, as transformers' ExecuTorch export does
    without a cache   the routed model's own forward on the whole sequence (one graph, dynamic length)

The cache is a transformers StaticCache (fixed-size tensors: attention keys/values, Mamba conv and SSM states),
so a graph's buffers keep their shapes across steps. Each new token's modality comes from `next_modality`.
"""
from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from sparsify.capture import attribute_replaced, forward_replaced
from sparsify.errors import SparsifyError
from sparsify.frontends import CACHE_ARGS
from sparsify.ops import check_modality_ids
from sparsify.ops._grouping import owned

CACHE = "sparsify_cache"  # the step module's child holding the cache tensors as buffers
STEP_OUTPUTS = ("logits", "hidden_states", "attentions")  # what a step graph returns of the model's output


@functools.cache
def _model_output():
    from transformers.utils import ModelOutput

    @dataclass
    class StepOutput(ModelOutput):
        """What generate reads back from a step: logits (hidden states, attentions where asked for), and the
        cache under the model's own name."""
        logits: torch.Tensor | None = None
        hidden_states: tuple | None = None
        attentions: tuple | None = None
        past_key_values: Any = None
        cache_params: Any = None

    return StepOutput


def _cache_slots(cache) -> list[tuple[str, dict, Any]]:
    """Every tensor a transformers Cache holds, as (name by layer and attribute, stable for one config;
    the dict holding it; its key there)."""
    slots = []
    for index, layer in enumerate(getattr(cache, "layers", [])):
        for attr, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                slots.append((f"layer{index}_{attr}", vars(layer), attr))
            elif isinstance(value, dict):
                slots += [(f"layer{index}_{attr}_{k}", value, k) for k, v in value.items() if isinstance(v, torch.Tensor)]
    return slots


def _slot_signature(cache) -> list:
    return [(name, tuple(where[key].shape), where[key].dtype) for name, where, key in _cache_slots(cache)]


class StepNotRoutable(SparsifyError):
    """The model's forward with a static cache could not be captured or routed (generate falls back to no cache)."""


class DecodingStep(nn.Module):
    """The dense model's forward with a cache held as buffers: `step(**model_inputs) -> logits`.

    It shares the dense model's parameter and module registries, so parameter FQNs are the dense ones and
    the routed model's stacked parameters bind to its graphs; the cache's tensors are buffers of a child
    named `sparsify_cache`. A captured graph is lifted: it reads those buffers by name at call time, so the
    graphs of one cache shape serve every cache of that shape.
    """

    def __init__(self, routed, cache, cache_arg: str):
        super().__init__()
        dense = routed._dense
        self._parameters = dense._parameters
        self._buffers = dense._buffers
        self._modules = dict(dense._modules)
        object.__setattr__(self, "_routed", routed)
        self.cache_arg = cache_arg
        self.phase = "prefill"  # then "decode": the model's code takes other paths once the cache holds tokens
        self.batch = None
        self.cache = cache
        self._bound: dict = {}  # (phase, input shapes) -> (graph entry, its arguments, user input positions)

    def allocate(self, batch: int) -> None:
        """Allocate the cache's tensors (transformers allocates them lazily, in the first forward): a graph's
        buffers must exist before it is captured. By one dense forward on dummy tokens, emptied again (~2% of a
        short generate call); or, once that has shown that transformers' own eager allocation (its export
        recipes' early_initialization) gives the same tensors for this model and kind of cache, by that. Not
        trusted unseen: it sizes every layer from the config's head counts, which a model may not use (Falcon's
        multi-query attention keeps one key head, GPT-BigCode likewise)."""
        self.batch = batch
        key = (type(self.cache), tuple(type(layer) for layer in getattr(self.cache, "layers", ())))
        verdicts = self._routed.__dict__.setdefault("_early_cache_allocation", {})
        if verdicts.get(key):
            self._early_initialize(self.cache)
        else:
            early = copy.deepcopy(self.cache)
            self._feed_dummy(self.cache)
            self.cache.reset()
            verdicts[key] = self._early_initialize(early) and _slot_signature(early) == _slot_signature(self.cache)
        self._use(self.cache)

    def _early_initialize(self, cache) -> bool:
        """transformers' eager allocation of a static cache where the model and every layer of the cache offer
        it; False where not."""
        layers = getattr(cache, "layers", None)
        dense = self._routed._dense
        shape_of = getattr(dense, "_get_static_cache_init_shape", None)
        if not layers or shape_of is None or not all(getattr(layer, "supports_early_init", False) for layer in layers):
            return False
        try:  # a config without attention heads or with layers it cannot size: allocate by a forward
            shape = shape_of()  # (heads, head_dim) from the config, None where transformers cannot tell
        except (AttributeError, TypeError, ValueError):
            return False
        if shape is None:
            return False
        parameter = next(dense.parameters())
        cache.early_initialization(batch_size=self.batch, num_heads=shape[0], head_dim=shape[1],
                                   dtype=parameter.dtype, device=parameter.device)
        return all(layer.is_initialized for layer in layers)

    def _feed_dummy(self, cache) -> None:
        dense = self._routed._dense
        dummy = torch.zeros(self.batch, 2, dtype=torch.long, device=next(self.parameters()).device)
        with self._routed.dense_forwards(), torch.no_grad():
            try:
                type(dense).forward(dense, input_ids=dummy, **{self.cache_arg: cache}, use_cache=True)
            except Exception as error:  # the model's own code with a fixed-size cache: say so, generate uncached
                raise StepNotRoutable(
                    f"the model's forward fails with transformers' static cache sized for the prompt and the new "
                    f"tokens ({type(error).__name__}: {error}); a model that adds positions of its own (a learned "
                    "prompt) writes more of them than that") from error

    def _use(self, cache) -> None:
        holder = nn.Module()
        for name, where, key in _cache_slots(cache):
            holder.register_buffer(name, where[key], persistent=False)
        if not len(holder._buffers):
            raise SparsifyError(f"the cache {type(cache).__name__} holds no tensors after a forward: sparsify "
                                "generates with a transformers StaticCache (fixed-size tensors)")
        self._modules[CACHE] = holder
        self.cache = cache

    def take_cache_tensors(self) -> None:
        """Copy into the graphs' buffers the tensors the cache object holds now, where Python code between two
        steps bound new ones (beam search's `reorder_cache`: each layer's tensors become reordered copies), and
        bind the cache to the buffers again: the graphs read and update their buffers, not the cache object."""
        buffers = self._modules[CACHE]._buffers
        slots = _cache_slots(self.cache)
        if {name for name, _, _ in slots} != set(buffers):
            raise SparsifyError(f"the {type(self.cache).__name__} changed which tensors it holds between two decoding "
                                "steps; sparsify's step graphs keep a fixed set of cache buffers: generate with "
                                "use_cache=False")
        for name, where, key in slots:
            value, buffer = where[key], buffers[name]
            if value is buffer:
                continue
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise SparsifyError(f"the cache's tensor {name} changed from {tuple(buffer.shape)} {buffer.dtype} to "
                                    f"{tuple(value.shape)} {value.dtype} between two decoding steps; sparsify's step "
                                    "graphs hold fixed-shape cache buffers: generate with use_cache=False")
            buffer.copy_(value)
            where[key] = buffer

    def cache_signature(self) -> tuple:
        buffers = self._modules[CACHE]._buffers.items()
        return (self.phase, tuple((name, tuple(t.shape), t.dtype) for name, t in buffers))

    @contextmanager
    def prepared(self):
        """While capturing: a scratch cache of the same shapes in the state of this phase (empty for the
        prefill, holding tokens for a decode step), so the model's code takes the path this phase runs."""
        real = self.cache
        scratch = copy.deepcopy(real)
        scratch.reset()
        if self.phase == "decode":
            self._feed_dummy(scratch)
        self._use(scratch)
        try:
            yield
        finally:
            self._use(real)

    def forward(self, **inputs):
        # While export traces this, the buffers are export's own tensors, not the ones the cache object holds:
        # hand them to the cache so its in-place updates are the graph's buffer mutations (at run time this
        # rebinds the same tensors).
        buffers = self._modules[CACHE]._buffers
        for name, where, key in _cache_slots(self.cache):
            where[key] = buffers[name]
        dense = self._routed._dense
        out = type(dense).forward(dense, **inputs, **{self.cache_arg: self.cache}, use_cache=True, return_dict=True)
        # The logits, and what else generate reads back where it was asked for (output_hidden_states=True,
        # output_attentions=True): the graph returns those too.
        return {name: out[name] for name in STEP_OUTPUTS if out.get(name) is not None}

    def run(self, inputs: dict, modality_ids: torch.Tensor) -> dict:
        routed = self._routed
        # Within one generate call parameters and cache tensors stay put, and every decode step has the same
        # shapes: the graph, its parameter / buffer arguments and the buffers it updates are looked up once per
        # shape, not per token (a step of a small model is a few milliseconds: per-step Python shows).
        shapes = tuple((k, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v)) for k, v in inputs.items())
        key = (self.phase, shapes)
        bound = self._bound.get(key)
        if bound is None:
            try:
                entry, flat = routed.graph_for(inputs, self)
            except SparsifyError as error:
                raise StepNotRoutable(f"{type(error).__name__}: {error}") from error
            graph = entry.routed
            args = routed.graph_args(graph, flat, owner=self)
            inputs_at = [(i, target) for i, (kind, target) in enumerate(graph.placeholders) if kind == "input"]
            updated = [self.get_buffer(name) for name in graph.mutated_buffers]
            bound = self._bound[key] = (entry.direct.forward, graph, args, inputs_at, updated)
        forward, graph, args, inputs_at, updated = bound
        flat = torch.utils._pytree.tree_leaves(((), inputs))  # as graph_for flattens them
        for position, target in inputs_at:
            args[position] = flat[target]
        outputs = forward(*args, owned(modality_ids))  # the GraphModule's code itself: no module-call machinery
        self.phase = "decode"
        return routed.unpack_outputs(graph, outputs, updated)


def modality_rule(next_modality, modalities: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`next_modality` as a function (new token ids [B], ids so far [B, L]) -> modality ids [B], validated."""
    def check(ids, new):
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = torch.full_like(new, ids)
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise SparsifyError(f"next_modality must give integer modality ids (an int or a LongTensor of shape "
                                f"[{new.shape[0]}]), got {type(ids).__name__} {getattr(ids, 'dtype', '')}")
        if ids.shape not in (new.shape, (*new.shape, 1)):
            raise SparsifyError(f"next_modality gave modality ids of shape {tuple(ids.shape)}; it must give one per "
                                f"sequence: shape [{new.shape[0]}] (batch)")
        ids = ids.reshape(new.shape).long().to(new.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= modalities):
            raise SparsifyError(f"next_modality gave modality ids in [{int(ids.min())}, {int(ids.max())}]; this "
                                f"model has {modalities} modalities: ids must lie in [0, {modalities})")
        return ids

    def modality(value, what):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < modalities:
            raise SparsifyError(f"{what}={value!r} is not a modality of this {modalities}-modality model: give an "
                                f"int in [0, {modalities})")
        return value

    if isinstance(next_modality, int) and not isinstance(next_modality, bool):
        constant = modality(next_modality, "next_modality")
        return lambda new, so_far: torch.full_like(new, constant)
    if isinstance(next_modality, Mapping):
        # Validated once here, so each step only compares token ids.
        ranges, default = [], modality(next_modality.get("default", 0), "next_modality['default']")
        for key, value in next_modality.items():
            if key == "default":
                continue
            if isinstance(key, range) and key.step == 1:
                key = (key.start, key.stop)
            if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) for v in key)):
                raise SparsifyError(f"next_modality mapping keys are token-id ranges: range(start, stop) or "
                                    f"(start, stop), or 'default'; got {key!r}")
            ranges.append((key, modality(value, f"next_modality[{key!r}]")))

        def by_range(new, so_far):
            ids = torch.full_like(new, default)
            for (start, stop), value in ranges:
                ids = torch.where((new >= start) & (new < stop), value, ids)
            return ids
        return by_range
    if callable(next_modality):
        return lambda new, so_far: check(next_modality(new, so_far), new)
    raise SparsifyError(f"next_modality must be an int, a mapping from token-id ranges to modalities, or a callable "
                        f"(new_token_ids, ids_so_far) -> modality ids; got {type(next_modality).__name__}")


class ModalityTracker:
    """The modality of every token of the sequences being generated: the prompt's as given, each new token's
    from the rule when the loop feeds it to the model."""

    def __init__(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, rule):
        self.tokens, self.modalities, self.rule = input_ids, modality_ids, rule
        self.prompts = input_ids.shape[0]  # rows of the user's batch (generate may repeat each)
        self.fed = 0  # tokens already in the cache

    def ids_for(self, input_ids: torch.Tensor, cached: bool) -> torch.Tensor:
        """Modality ids for the tokens of this forward: with a cache, the uncached tail of the sequence; without
        one, the whole sequence."""
        if input_ids.shape[0] != self.tokens.shape[0]:  # generate expanded the batch (num_return_sequences)
            repeat = input_ids.shape[0] // self.tokens.shape[0]
            self.tokens = self.tokens.repeat_interleave(repeat, 0)
            self.modalities = self.modalities.repeat_interleave(repeat, 0)
        if not cached:
            self.follow(input_ids)
        start = self.fed if cached else 0
        end = start + input_ids.shape[1]
        for position in range(self.tokens.shape[1], end):
            new = input_ids[:, position - start]
            self.tokens = torch.cat([self.tokens, new[:, None]], 1)
            self.modalities = torch.cat([self.modalities, self.rule(new, self.tokens)[:, None]], 1)
        if cached:
            self.fed = end
        return self.modalities[:, start:end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i now continues row rows[i]'s sequence (beam search kept some beams and dropped others)."""
        rows = rows.to(self.tokens.device)
        self.tokens = self.tokens.index_select(0, rows)
        self.modalities = self.modalities.index_select(0, rows)

    def follow(self, input_ids: torch.Tensor) -> None:
        """Without a cache generate passes the whole sequences at every step, and beam search may have reordered
        them since the last one, without telling the model: give each row the history of the row whose tokens
        it now starts with. Searched among the rows of the same prompt only: those share the prompt's modality
        ids, so equal tokens mean equal modality ids (next_modality is a function of the tokens)."""
        known = self.tokens.shape[1]
        if input_ids.shape[0] != self.tokens.shape[0] or input_ids.shape[1] < known \
                or torch.equal(input_ids[:, :known], self.tokens):
            return
        prompts = self.prompts
        group = input_ids.shape[0] // prompts
        now = input_ids[:, :known].reshape(prompts, group, 1, known)
        before = self.tokens.reshape(prompts, 1, group, known)
        same = (now == before).all(-1)  # [prompt, row now, row before]
        if not bool(same.any(-1).all()):
            raise SparsifyError("generate passed sequences that continue none of the sequences generated so far, so "
                                "their tokens' modality ids are unknown; sparsify follows sequences that generate "
                                "extends, repeats or reorders (sampling, beam search)")
        first = same.int().argmax(-1)  # the first row of the prompt holding that history
        self.reorder((first + torch.arange(prompts, device=first.device)[:, None] * group).reshape(-1))


def generate(routed, input_ids: torch.Tensor, modality_ids: torch.Tensor | None = None, next_modality=0,
             **kwargs) -> torch.Tensor:
    dense = routed._dense
    if not callable(getattr(dense, "generate", None)) or not hasattr(dense, "generation_config"):
        raise SparsifyError(f"generate() needs a Hugging Face causal LM (GenerationMixin); {type(dense).__name__} "
                            "is not one: call the routed model in your own decoding loop")
    modalities = routed.plan.modalities
    if modality_ids is None:
        raise SparsifyError("generate() needs modality_ids for the prompt: LongTensor[batch, prompt_len] with ids in "
                            f"[0, {modalities}); `next_modality` decides the new tokens' modalities")
    modality_ids = check_modality_ids(modality_ids, input_ids.shape[:2], modalities).to(input_ids.device)
    given = [name for name in CACHE_ARGS if kwargs.get(name) is not None]
    if given:
        raise SparsifyError(f"generate() got {given[0]}=: sparsify keeps the cache inside the routed graphs and "
                            "builds it for each call; a cache made elsewhere (another model, the dense model) "
                            "cannot be used. Drop the argument.")
    assisted = [name for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
                if kwargs.get(name, getattr(dense.generation_config, name, None)) is not None]
    if assisted:
        raise SparsifyError(f"assisted generation ({assisted[0]}=) is not supported: it crops the cache after "
                            "rejected draft tokens, which transformers does only for a dynamic cache, and the routed "
                            "step graphs hold a static one. Generate without it, or take one modality's dense model "
                            "(sparsify.extract) and use assisted generation there.")
    signature = inspect.signature(dense.forward)
    cache_arg = next((name for name in CACHE_ARGS if name in signature.parameters), None)
    use_cache = kwargs.get("use_cache", dense.generation_config.use_cache) and cache_arg is not None
    if use_cache and hasattr(dense, "_reorder_cache") and kwargs.get("num_beams", dense.generation_config.num_beams or 1) > 1:
        raise SparsifyError(f"{type(dense).__name__} reorders its cache for beam search with its own "
                            "_reorder_cache, which sparsify cannot follow into the routed graphs' cache buffers: "
                            "pass use_cache=False with num_beams > 1")
    rule = modality_rule(next_modality, modalities)
    if use_cache and "_uncached_generation" not in routed.__dict__:
        random_state = _random_state()
        try:
            return _generate(routed, input_ids, ModalityTracker(input_ids, modality_ids, rule), cache_arg, signature,
                             kwargs)
        except StepNotRoutable as error:
            # Remembered per routed model: the same forward fails the same way in the next call.
            lines = str(error).splitlines()  # a RoutingError's first line is a heading; its first item says what
            routed.__dict__["_uncached_generation"] = " ".join(lines[:2])[:400]
            _random_state(random_state)  # the new tokens drawn as if the first attempt had not been made
    if use_cache:
        warnings.warn(
            f"sparsify could not route {type(dense).__name__}'s forward with a cache "
            f"({routed.__dict__['_uncached_generation']}); generating without one: each new token runs the routed "
            "model on the whole sequence so far (the same tokens, more work per token for long outputs). Pass "
            "use_cache=False to generate this way without the attempt.", stacklevel=3)
    return _generate(routed, input_ids, ModalityTracker(input_ids, modality_ids, rule), None, signature, kwargs)


def _random_state(state=None):
    """torch's generators' state (CPU, and CUDA where it is in use), or restore one."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if state is None:
        return torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _generate(routed, input_ids: torch.Tensor, tracker: "ModalityTracker", cache_arg: str | None,
              signature: inspect.Signature, kwargs: dict):
    """One `dense.generate` call with the forward replaced by the routed one (`signature`: the dense forward's):
    with the cache argument `cache_arg` in the routed step graphs, or without a cache where it is None."""
    dense = routed._dense
    takes_mask = "attention_mask" in signature.parameters
    kwargs = dict(kwargs)
    use_cache = cache_arg is not None
    if use_cache:
        # transformers builds a StaticCache sized for this call (batch after expansion, max length).
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["use_cache"] = False
    step_output = _model_output()
    state: dict[str, DecodingStep] = {}
    hooks = ExitStack()  # on the cache object, for this call only (transformers may reuse the object in the next)
    if use_cache:
        own_prepare = dense._prepare_static_cache
        prepare_signature = inspect.signature(own_prepare)

        def prepare_static_cache(*args, **options):  # transformers' static cache, sliding layers at full length
            try:
                cache = own_prepare(*args, **options)
            except Exception as error:  # a layer kind transformers' StaticCache does not know (DeepSeek-V4's)
                raise StepNotRoutable(f"transformers cannot build a static cache for it: {type(error).__name__}: "
                                      f"{error}") from error
            _full_length_layers(cache, prepare_signature.bind(*args, **options).arguments["max_cache_len"])
            return cache
        hooks.enter_context(attribute_replaced(dense, "_prepare_static_cache", prepare_static_cache))

    def forward(**model_inputs):
        tokens = model_inputs["input_ids"]
        ids = tracker.ids_for(tokens, cached=use_cache)
        if not use_cache:
            model_inputs = {k: v for k, v in model_inputs.items() if k not in CACHE_ARGS and k != "use_cache"}
            with forward_replaced(dense, type(dense).forward.__get__(dense)):
                return routed(**model_inputs, modality_ids=ids)
        cache = model_inputs.pop(cache_arg, None)
        if cache is None:  # generate made no static cache: the model keeps a cache of its own (MiniMax's)
            raise StepNotRoutable(f"{type(dense).__name__} does not take transformers' static cache (generate passed "
                                  f"no {cache_arg})")
        if "step" not in state:
            state["step"] = step = DecodingStep(routed, cache, cache_arg)
            step.allocate(tokens.shape[0])
            state["mask_length"] = _mask_length(cache)
            state["attention_only"] = _attention_only(cache)
            own_reorder = cache.reorder_cache

            def reorder_cache(beam_idx):  # beam search, between two steps: the cache's own reorder, then ours
                own_reorder(beam_idx)
                step.take_cache_tensors()
                tracker.reorder(beam_idx)
            hooks.enter_context(attribute_replaced(cache, "reorder_cache", reorder_cache))
        step = state["step"]
        if cache is not step.cache:
            raise SparsifyError("internal: generate passed a different cache object mid-generation")
        inputs = {"input_ids": tokens, **{k: v for k, v in model_inputs.items()
                                          if k not in ("input_ids", "use_cache", "return_dict")}}
        if takes_mask and inputs.get("attention_mask") is None and state["mask_length"]:
            # transformers drops a mask of all ones. Without one, many models (RoFormer, BioGPT, GIT, ...) take the
            # tokens so far from the cache (get_seq_length), which a static attention cache's tensors give only as a
            # data-dependent count that a graph can neither size a tensor by nor branch on. The mask says it as a
            # shape. (Only for an attention cache: a recurrent layer's decode step reads no mask.)
            inputs["attention_mask"] = torch.ones(tokens.shape[0], tracker.fed, dtype=torch.long, device=tokens.device)
        mask = inputs.get("attention_mask")
        if (step.phase == "decode" or state["attention_only"]) and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
                and mask.shape[-1] < state["mask_length"]:
            inputs["attention_mask"] = torch.nn.functional.pad(mask, (0, state["mask_length"] - mask.shape[-1]))
        outputs = step.run(inputs, ids)
        if "attentions" in outputs and state["mask_length"]:
            # Attention weights over the static cache's whole length; the keys past the tokens so far are
            # masked (weight 0). Cut to the keys so far, as the dense model's growing cache returns them.
            outputs["attentions"] = tuple(
                a[..., :tracker.fed] if a.shape[-1] == state["mask_length"] else a for a in outputs["attentions"])
        return step_output(**outputs, **{cache_arg: cache})

    forward.__signature__ = signature
    # With a compileable (static) cache transformers turns the 2-D padding mask into the 4-D attention mask in
    # Python before every step (create_masks_for_generate): ~0.25 ms of a ~5 ms step of a small Llama. Left
    # 2-D, the model's own forward builds the 4-D mask inside the captured prefill and decode graphs.
    with hooks, forward_replaced(dense, forward), attribute_replaced(
            dense, "create_masks_for_generate", lambda attention_mask=None, **ignored: attention_mask):
        return dense.generate(input_ids, **kwargs)


def _full_length_layers(cache, max_cache_len: int) -> None:
    """Replace the static cache's sliding-window layers (sliding or chunked attention) by full-length ones:
    as long as its full layers (transformers may size those for an earlier, longer call), at least
    `max_cache_len` (the length asked for).

    A sliding layer's update branches on a Python counter (whether the window is full yet) and its mask offset
    moves with it: a captured step graph keeps the branch and offset of the step it was captured at, and later
    steps wrote past the window (an index error) or attended to the wrong keys. A full-length layer's update is
    one in-place copy at the current position, as for every other attention layer; the model's own sliding
    (or chunked) attention mask, built from the config, then hides the keys outside each query's window, so
    attention is the dense model's. The cost: the layer holds the whole length instead of the window."""
    from transformers import cache_utils

    full_of = {cache_utils.StaticSlidingWindowLayer: cache_utils.StaticLayer,
               cache_utils.LinearAttentionAndStaticSlidingWindowAttentionLayer:
                   cache_utils.LinearAttentionAndStaticFullAttentionLayer}
    layers = getattr(cache, "layers", None) or []
    length = max([max_cache_len, *(getattr(layer, "max_cache_len", 0) for layer in layers
                                   if not getattr(layer, "is_sliding", False))])
    for index, layer in enumerate(layers):
        if not getattr(layer, "is_sliding", False):
            continue
        full = full_of.get(type(layer))
        if full is None:
            raise SparsifyError(f"the cache's layer {index} is a {type(layer).__name__}, a sliding-window layer "
                                "sparsify does not know how to hold at full length in its step graphs: generate "
                                "with use_cache=False")
        states = {"number_of_states": layer.number_of_states} if hasattr(layer, "number_of_states") else {}
        layers[index] = full(max_cache_len=length, **states)


def _mask_length(cache) -> int:
    """The width a decode step's 2-D padding mask is zero-padded to, so that every decode step has one shape
    (one graph; growing by a column per step, the graphs' size guards re-captured it near the cache's end): the
    static cache's length, or 0 (left as it is) for a cache that is not compileable. transformers pads a shorter
    mask the same way for attention; the columns past the current position are masked as future tokens anyway.
    The prefill's mask is padded only where the cache has no recurrent layer (_attention_only): a recurrent
    layer's mask is the mask's last `prompt length` columns (create_recurrent_attention_mask), which zeros at the
    end would shift; a one-token step has no such mask."""
    if not getattr(cache, "is_compileable", False):
        return 0
    return max((getattr(layer, "max_cache_len", 0) for layer in getattr(cache, "layers", ())), default=0)


def _attention_only(cache) -> bool:
    """Whether every layer of the cache is an attention layer (no recurrent state): then the prefill's 2-D mask
    is zero-padded to the cache's length as well, as transformers pads it for attention (prepare_padding_mask),
    so that a model building something else from the raw mask (BLOOM's ALiBi) sees the keys' length."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return not any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in getattr(cache, "layers", ()))
