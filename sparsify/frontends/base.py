"""The Frontend protocol: what sparsify needs to know about a model family, and nothing about routing.

A frontend says whether it serves a model (`matches`), how to call the model once for capture
(`example_inputs`, `call_defaults`, `check_capture`), which of the family's opaque kernels take their
graph forms while capturing (`graph_forms`: a scan, a fused norm), how to save the model code-free and
rebuild it (`describe`, `rebuild`), and what its forward calls its cache (`cache_args`). The Hugging Face,
token-ids and mamba_ssm frontends are instances (sparsify/frontends/__init__.py lists them in the order
they are asked). Routing never reads a frontend: it works on the captured graph alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable


def _nothing(*args, **kwargs):
    return None


@dataclass(frozen=True)
class Frontend:
    name: str
    matches: Callable[[Any], bool]
    # model -> {input name: value} to capture with, or None if this frontend cannot make them
    example_inputs: Callable[[Any], dict | None] = _nothing
    call_defaults: Callable[[Any], dict] = lambda model: {}   # keywords every call gets (use_cache=False)
    # (model, captured, inputs) -> None, or raises: the inputs the frontend guessed were not what it thought
    check_capture: Callable[..., None] = _nothing
    capture_note: Callable[[Any, dict], str | None] = _nothing  # a note for a CaptureError with guessed inputs
    # a context manager entered around every capture (whatever the model): the family's kernels as graph forms
    graph_forms: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    describe: Callable[[Any], dict | None] = _nothing        # code-free description to rebuild the model from
    rebuild: Callable[[dict], Any] | None = None             # description (its "kind" is this name) -> module
    write_files: Callable[[Any, Any], None] = _nothing       # (model, directory): files a checkpoint also needs
    cache_args: tuple[str, ...] = ()                         # what the model's forward calls its cache
