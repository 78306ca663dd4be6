"""Per-family help for capture: example inputs, call defaults, kernels as graph forms, saving model code-free.

Each frontend is an instance of the Frontend protocol (base.py). Frontends know how to *build inputs for*,
*capture* and *save/rebuild* a model family; routing never depends on them.
"""
from __future__ import annotations

import contextlib

from sparsify.frontends import huggingface, mamba_ssm, token_ids
from sparsify.frontends.base import Frontend

# Asked in this order: the first that matches a model serves it (a Hugging Face model has a vocabulary
# too, but its own frontend knows more).
FRONTENDS: tuple[Frontend, ...] = (huggingface.FRONTEND, token_ids.FRONTEND, mamba_ssm.FRONTEND)
CACHE_ARGS = tuple(name for frontend in FRONTENDS for name in frontend.cache_args)


def for_model(model) -> Frontend | None:
    return next((frontend for frontend in FRONTENDS if frontend.matches(model)), None)


def call_defaults(model) -> dict:
    frontend = for_model(model)
    return frontend.call_defaults(model) if frontend is not None else {}


def by_name(name: str) -> Frontend | None:
    return next((frontend for frontend in FRONTENDS if frontend.name == name), None)


@contextlib.contextmanager
def graph_forms():
    """Every frontend's kernels as their graph forms, for one capture."""
    with contextlib.ExitStack() as stack:
        for frontend in FRONTENDS:
            stack.enter_context(frontend.graph_forms())
        yield
