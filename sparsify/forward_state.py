"""What a dense forward depended on while it was captured: the state that picks a routed graph.

A captured graph is the dense forward's Python run once, with every `if` on a
flag already taken: `use_cache`, `output_attentions`, Hugging Face's
`gradient_checkpointing`, `self.training`, `torch.is_grad_enabled()`. As
torch.compile's guards do, the routed model keys each graph by that state and
captures again when it changes, instead of running a graph the model's Python
would no longer take:

- ambient state that changes what ops compute without the model reading it: autocast (enabled and dtype, per
  device type), always part of the key (`ambient_state`);
- what the forward read: attributes of its modules (recorded while capturing by giving each module a
  recording subclass, as FSDP2 gives each module its FSDP subclass), which module each submodule it called
  was (a LoRA layer put in a linear's place needs a new graph), the plain objects those attributes hold
  (a config: guarded on every scalar it holds, as the reads inside it are not recorded), and
  `torch.is_grad_enabled()` where the model calls it (`Guards`);
- what the forward did with `torch.utils.checkpoint`: which module's forward it recomputes in backward, with
  which options (`checkpointed`), so the routed module runs its subgraph under the same checkpoint. Export
  traces through a checkpoint and leaves no trace of it in the graph, which is why it is recorded here.
"""
from __future__ import annotations

import copy
import enum
import functools
import sys
import warnings
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from sparsify.errors import SparsifyError

_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device, enum.Enum)
_MISSING = object()
# Read by export, by nn.Module's own machinery or by sparsify while capturing, not by the model's code.
_NOT_STATE = ({"forward", "__dict__", "__class__", "call_super_init", "_compiled_call_impl"}
              | set(vars(nn.Module())) - {"training"})  # nn.Module's hooks and registries: FSDP2 adds hooks
AUTOCAST_DEVICES = ("cpu", "cuda")
# Where torch's CheckpointWrapper keeps the module it wraps (module_tree.WRAPPED; not imported from there,
# which imports the routing passes: this runs in the per-forward guard check).
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def ambient_state() -> tuple:
    """Autocast as the ops will see it: part of every graph key (a graph captured under autocast computes
    its matmuls in the autocast dtype; routed ops cast their operands as the op they replaced did)."""
    return tuple((device, torch.is_autocast_enabled(device),
                  torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
                 for device in AUTOCAST_DEVICES)


def _guardable(value) -> bool:
    """A value a graph can be guarded on by equality: scalars, and tuples, lists and str-keyed dicts of them
    (a config's rope_scaling); lists and dicts are guarded on a copy, as the model may change them in place."""
    if isinstance(value, _SCALARS):
        return True
    if type(value) in (tuple, list):
        return all(_guardable(v) for v in value)
    return type(value) is dict and all(isinstance(k, str) and _guardable(v) for k, v in value.items())


def _snapshot(value):
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def _same(a, b) -> bool:
    """Whether a value read now is the one read at capture. Callables an instance holds compare by what they
    call: a new functools.partial of the same function with the same arguments (as each
    `gradient_checkpointing_enable` makes) is the same. No id(): torch.compile traces this."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, functools.partial):
        return (_same(a.func, b.func) and len(a.args) == len(b.args) and all(map(_same, a.args, b.args))
                and a.keywords.keys() == b.keywords.keys() and all(_same(v, b.keywords[k]) for k, v in a.keywords.items()))
    if isinstance(a, types.MethodType):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return _guardable(a) and a == b


def _plain_object(value) -> bool:
    """An object a module holds whose scalars the forward may read (a config), not code or tensors."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType))
            and not callable(value))


@dataclass
class Guards:
    """The state one graph was captured in: (object, attribute, value) reads that must all still hold."""
    reads: list[tuple[Any, str, Any]] = field(default_factory=list)
    grad_enabled: bool | None = None   # set where the forward called torch.is_grad_enabled()

    def holds(self) -> bool:
        if self.grad_enabled is not None and torch.is_grad_enabled() != self.grad_enabled:
            return False
        return all(_same(_value(obj, name), value) for obj, name, value in self.reads)

    def _mismatched(self) -> list[tuple[Any, str, Any]]:
        return [(obj, name, value) for obj, name, value in self.reads if not _same(_value(obj, name), value)]

    def changed(self) -> list[str]:
        """The reads that no longer hold, as 'Class.attribute: captured with X, now Y'."""
        out = [f"{type(obj).__name__}.{name}: captured with {value!r}, now {_value(obj, name)!r}"
               for obj, name, value in self._mismatched()]
        if self.grad_enabled is not None and torch.is_grad_enabled() != self.grad_enabled:
            out.append(f"torch.is_grad_enabled(): captured with {self.grad_enabled}, now {not self.grad_enabled}")
        return out

    def settled(self) -> "Guards":
        """These guards less the reads the forward itself changed (a counter it increments): warned about,
        as a graph cannot depend on them (export took the value it read)."""
        changed = self._mismatched()
        if not changed:
            return self
        warnings.warn(f"sparsify: the model's forward changes {', '.join(f'{type(o).__name__}.{n}' for o, n, _ in changed[:5])} "
                      "while it runs; the captured graph used the value read first and is not captured again when "
                      "it changes", stacklevel=4)
        changed_ids = {(id(o), n) for o, n, _ in changed}
        return Guards([r for r in self.reads if (id(r[0]), r[1]) not in changed_ids], self.grad_enabled)


def _value(obj, name: str):
    """What `obj.name` is now. Modules through getattr (as the forward read them); other objects through their
    __dict__ (what was guarded: a config's own getattr may refuse a global read, as Gemma 4's per-layer one)."""
    if isinstance(obj, nn.Module):
        value = getattr(obj, name, _MISSING)
        while isinstance(getattr(value, CHECKPOINT_WRAPPED, None), nn.Module):  # an activation-checkpoint
            value = getattr(value, CHECKPOINT_WRAPPED)   # wrapper added since stands for what it wraps
        return value
    return vars(obj).get(name, _MISSING)


@dataclass
class CheckpointUse:
    """One `torch.utils.checkpoint.checkpoint` call the forward made around one module's forward."""
    use_reentrant: bool
    options: dict  # preserve_rng_state, and for the non-reentrant form context_fn, determinism_check, debug

    def run(self, forward, *args):
        # Options at their defaults are left out: dynamo's checkpoint refuses a context_fn argument it has not
        # looked into yet (a block compiled on its own under Hugging Face's checkpointing), even the default one.
        options = {name: value for name, value in self.options.items()
                   if value != _DEFAULT_OPTIONS.get(name, _MISSING)}
        return torch_checkpoint.checkpoint(forward, *args, use_reentrant=self.use_reentrant, **options)


_DEFAULT_OPTIONS = {"preserve_rng_state": True, "context_fn": torch_checkpoint.noop_context_fn,
                    "determinism_check": "default", "debug": False}


@dataclass
class Recording:
    """Filled while a forward is captured (`recorded`)."""
    modules: dict[int, str]                     # id(module) -> FQN in the captured tree
    guards: Guards = field(default_factory=Guards)
    checkpointed: dict[str, CheckpointUse] = field(default_factory=dict)
    _seen: set = field(default_factory=set)
    _objects: set = field(default_factory=set)

    def read(self, obj, name: str, value) -> None:
        if name in _NOT_STATE or name.startswith("_sparsify") or (id(obj), name) in self._seen:
            return
        if _guardable(value) or (callable(value) and not isinstance(value, (nn.Module, torch.Tensor))
                                 and name in object.__getattribute__(obj, "__dict__")):
            # a scalar, or a function the instance holds (HF's _gradient_checkpointing_func), not a method
            self._seen.add((id(obj), name))
            self.guards.reads.append((obj, name, _snapshot(value)))
        elif _plain_object(value) and id(value) not in self._objects:
            self._guard_scalars_of(value, depth=2)

    def read_child(self, module: nn.Module, name: str, child: nn.Module) -> None:
        """A submodule the forward called or read: the graph holds its code, so it must still be that module (not
        one a tool put in its place since, as PEFT's LoRA layer)."""
        if (id(module), name) not in self._seen:
            self._seen.add((id(module), name))
            self.guards.reads.append((module, name, child))

    def _guard_scalars_of(self, obj, depth: int) -> None:
        self._objects.add(id(obj))
        for name, value in list(vars(obj).items()):
            if _guardable(value):
                self._seen.add((id(obj), name))
                self.guards.reads.append((obj, name, _snapshot(value)))
            elif depth > 1 and _plain_object(value) and id(value) not in self._objects:
                self._guard_scalars_of(value, depth - 1)

    def checkpoint(self, function, use_reentrant: bool, options: dict) -> None:
        module = _module_of(function)
        fqn = self.modules.get(id(module)) if module is not None else None
        if fqn is None:
            raise SparsifyError(
                f"the model's forward calls torch.utils.checkpoint.checkpoint on {function!r}, which is not one "
                "module's forward: a routed model recomputes whole modules only. Checkpoint modules instead "
                "(checkpoint(module, ...), Hugging Face's gradient_checkpointing_enable(), or "
                "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.apply_activation_checkpointing).")
        self.checkpointed[fqn] = CheckpointUse(use_reentrant, options)


def _module_of(function) -> nn.Module | None:
    """The module whose forward `function` runs: the module, its bound forward/__call__, or a partial of
    either (Hugging Face checkpoints partial(<class forward>, module, **kwargs))."""
    if isinstance(function, nn.Module):
        return function
    if isinstance(function, types.MethodType) and isinstance(function.__self__, nn.Module):
        return function.__self__
    if isinstance(function, functools.partial):
        inner = _module_of(function.func)
        if inner is not None:
            return inner
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
    return None


_active: list[Recording] = []
_recording_classes: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """`cls` with every attribute read reported to the active recording. Same name and module as `cls`, so
    export's module stack and any name-based check see the dense class."""
    sub = _recording_classes.get(cls)
    if sub is None:
        def __getattribute__(self, name):
            value = super(sub, self).__getattribute__(name)
            if _active:
                _active[-1].read(self, name, value)
            return value

        def __getattr__(self, name):  # parameters, buffers and submodules (nn.Module.__getattr__)
            value = super(sub, self).__getattr__(name)
            if _active and isinstance(value, nn.Module):
                _active[-1].read_child(self, name, value)
            return value
        sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__getattr__": __getattr__,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "_sparsify_recording": True})
        _recording_classes[cls] = sub
    return sub


class _CheckpointFunction:
    """Stands in for torch.utils.checkpoint.CheckpointFunction (use_reentrant=True) while capturing."""
    @staticmethod
    def apply(function, preserve_rng_state, *args):
        _active[-1].checkpoint(function, True, {"preserve_rng_state": preserve_rng_state})
        return function(*args)


def _without_reentrant(function, preserve_rng_state, context_fn, determinism_check, debug, *args, **kwargs):
    """Stands in for the non-reentrant checkpoint's set-up generator while capturing: records, then lets
    checkpoint() run the function plainly (one yield, between set-up and tear-down, as the real one)."""
    _active[-1].checkpoint(function, False, {"preserve_rng_state": preserve_rng_state, "context_fn": context_fn,
                                             "determinism_check": determinism_check, "debug": debug})
    yield


@contextmanager
def recorded(root: nn.Module):
    """Record what `root`'s forward reads and checkpoints inside the block (see the module docstring)."""
    modules = {id(m): fqn for fqn, m in root.named_modules(remove_duplicate=False)}
    recording = Recording(modules=modules)
    swapped = []
    for module in {id(m): m for m in root.modules()}.values():
        cls = type(module)
        if getattr(cls, "_sparsify_recording", False):
            continue
        module.__class__ = _recording_class(cls)
        swapped.append((module, cls))
    real_grad_enabled = torch.is_grad_enabled
    callers_grad_mode = real_grad_enabled()  # capture itself runs under no_grad (capture.py)

    def is_grad_enabled():
        if sys._getframe(1).f_globals.get("__name__", "").startswith("torch"):  # export's own code
            return real_grad_enabled()
        recording.guards.grad_enabled = callers_grad_mode  # the model's code: it sees the caller's mode
        return callers_grad_mode

    patches = [(torch, "is_grad_enabled", is_grad_enabled),
               (torch_checkpoint, "CheckpointFunction", _CheckpointFunction),
               (torch_checkpoint, "_checkpoint_without_reentrant_generator", _without_reentrant)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    _active.append(recording)
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield recording
    finally:
        _active.pop()
        for owner, name, value in saved:
            setattr(owner, name, value)
        for module, cls in swapped:
            module.__class__ = cls
