"""Example inputs for any language model whose first input is token ids: mamba_ssm's MambaLMHeadModel,
a user's own `nn.Module`. Nothing here knows a class: the vocabulary comes from `config.vocab_size`
(an object, dataclass or dict) or from the model's first `nn.Embedding`, and after capture the
first input must be what an embedding looks up, or the guess is withdrawn with a clear error.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from sparsify.errors import SparsifyError
from sparsify.frontends.base import Frontend

# Capture-time batch and sequence sizes (every frontend's): small, distinct, and unlike common feature
# sizes; provenance does not need that, but it keeps size-matching fallbacks unambiguous.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 13
# Ops a token-id tensor may pass through on its way into an embedding lookup.
PASS_THROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._to_copy.default,
                torch.ops.aten.to.dtype, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default,
                torch.ops.aten.alias.default, torch.ops.aten.detach.default}


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


def first_input_name(model: nn.Module) -> str | None:
    for name, parameter in inspect.signature(model.forward).parameters.items():
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return name
        return None
    return None


def random_token_ids(model: nn.Module, vocab: int, seq: int = EXAMPLE_SEQ) -> torch.Tensor:
    """Token ids [EXAMPLE_BATCH, seq] in [0, vocab) on the model's device, the same every time."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=generator).to(next(model.parameters()).device)


def example_inputs(model: nn.Module) -> dict[str, Any] | None:
    """{first input: random token ids [2, 13]}, or None if the model shows no vocabulary."""
    vocab, name = vocab_size(model), first_input_name(model)
    if vocab is None or name is None:
        return None
    return {name: random_token_ids(model, vocab)}


def feeds_an_embedding(token_input: torch.fx.Node, max_depth: int = 4) -> bool:
    """Whether the captured token input is looked up by an embedding (possibly after views or casts)."""
    frontier = [token_input]
    for _ in range(max_depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user.target == torch.ops.aten.embedding.default and user.args[1] is node:
                    return True
                if user.target in PASS_THROUGH and user.args[0] is node:
                    following.append(user)
        frontier = following
    return False


def guess_note(model: nn.Module, name: str) -> str:
    return (f"{type(model).__name__} has a vocabulary, so sparsify called it with random token ids [2, 13] as "
            f"its first input '{name}'. If that is not how it is called, pass example_inputs=(tokens,) (and "
            "example_kwargs={...}) as you would call the model.")


def check_guess(model: nn.Module, captured, name: str) -> None:
    """Withdraw the token-ids guess when capture shows the first input is not looked up by an embedding."""
    if not feeds_an_embedding(captured.user_input_nodes()[0]):
        raise SparsifyError("the captured graph does not look the first input up in an embedding, so it is not "
                            "token ids. " + guess_note(model, name))


def _matches(model: nn.Module) -> bool:
    return vocab_size(model) is not None and first_input_name(model) is not None


FRONTEND = Frontend(
    name="token_ids", matches=_matches, example_inputs=example_inputs,
    check_capture=lambda model, captured, inputs: check_guess(model, captured, next(iter(inputs))),
    capture_note=lambda model, inputs: guess_note(model, next(iter(inputs))))
