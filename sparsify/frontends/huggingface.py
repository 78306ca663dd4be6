"""Hugging Face transformers: example inputs from the config, use_cache=False, config-based rebuild, and the
Mamba-family scan as one op while capturing."""
from __future__ import annotations

import importlib
import inspect
import sys
from contextlib import contextmanager
from typing import Any

import torch

from sparsify.errors import SparsifyError
from sparsify.frontends.base import Frontend
from sparsify.ops.selective_scan import selective_scan_fn
from sparsify.ops.ssd_scan import ssd_scan_fn
from sparsify.frontends.token_ids import EXAMPLE_SEQ, random_token_ids

# What Hugging Face forwards call their cache argument (attention models; Mamba models).
CACHE_ARGS = ("past_key_values", "cache_params")


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def call_defaults(model) -> dict[str, Any]:
    """Keywords every call gets unless the caller sets them: a cache object cannot be exported.

    Some models take use_cache only through **kwargs (passed on to their backbone), so it is
    set there too when the config, or its language model's (a speech-text model's), has one.
    """
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and any(hasattr(c, "use_cache") for c in _text_configs(model.config))):
        return {"use_cache": False}
    return {}


def _text_configs(config) -> list:
    """The config and its language model's (vision-language and speech-text models keep the text sizes in a
    sub-config)."""
    subs = [getattr(config, name, None) for name in ("text_config", "language_config", "llm_config")]
    return [config] + [sub for sub in subs if sub is not None and not isinstance(sub, dict)]


def _vocab_size(model) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, torch.nn.Embedding):
        return embeddings.num_embeddings
    return next((c.vocab_size for c in _text_configs(model.config) if getattr(c, "vocab_size", None)), None)


# Special token ids of text itself; every other `*_token_id` of a config marks a placeholder.
TEXT_TOKENS = {"pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id", "unk_token_id", "mask_token_id"}


def placeholder_token_fields(config):
    """(field name, token ids) of every special token id the config and its sub-configs (text, vision, audio)
    name, text's own (pad, bos, eos, ...) left out: the placeholders of other modalities (image, video, audio)
    and their begin/end markers."""
    for c in [config, *(value for value in vars(config).values() if hasattr(value, "to_dict"))]:
        for name, value in vars(c).items():
            if name.endswith(("_token_id", "_token_index", "_token_ids")) and name not in TEXT_TOKENS:
                values = value if isinstance(value, (list, tuple)) else [value]
                yield name, [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _placeholder_token_ids(config) -> set[int]:
    """A text-only example must not contain the placeholders, or the model asks for pixel values."""
    return {i for _, ids in placeholder_token_fields(config) for i in ids}


def example_inputs(model) -> dict[str, Any]:
    config = model.config
    vocab = _vocab_size(model)
    if not vocab:
        raise SparsifyError(f"{type(model).__name__} shows no vocabulary (no input embedding, no vocab_size in its "
                            "config or text_config): pass example_inputs to convert().")
    lengths = [getattr(c, key, None) for c in _text_configs(config) for key in ("max_position_embeddings", "n_positions")]
    max_len = next((n for n in lengths if isinstance(n, int) and n > 0), EXAMPLE_SEQ)  # XLNet's -1: no limit
    tokens = random_token_ids(model, vocab, min(EXAMPLE_SEQ, max_len))
    reserved = sorted(i for i in _placeholder_token_ids(config) if 0 <= i < vocab)
    if reserved:
        allowed = torch.tensor([i for i in range(vocab) if i not in set(reserved)], device=tokens.device)
        tokens = torch.where(torch.isin(tokens, torch.tensor(reserved, device=tokens.device)),
                             allowed[tokens % len(allowed)], tokens)
    return {"input_ids": tokens, **call_defaults(model)}


def describe(model) -> dict[str, Any]:
    """What `sparsify.load` needs to rebuild the dense model without its code: class and config."""
    cls = type(model)
    return {"kind": "huggingface", "class": f"{cls.__module__}:{cls.__qualname__}", "config": model.config.to_dict()}


def rebuild(description: dict[str, Any]) -> torch.nn.Module:
    module_name, _, qualname = description["class"].partition(":")
    # Only classes shipped by transformers are imported from a checkpoint's metadata: a
    # checkpoint never names code to run.
    if not module_name.startswith("transformers."):
        raise SparsifyError(f"refusing to import {description['class']!r} named by a checkpoint: "
                            "pass the dense model (or a factory) to sparsify.load(path, model=...)")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as e:
        raise SparsifyError(f"cannot import {description['class']} ({e}); install a transformers version "
                            "that has it, or pass model=... to sparsify.load") from None
    config = cls.config_class.from_dict(description["config"])
    return cls(config)


# transformers' Mamba-family selective scan (Mamba, FalconMamba, Jamba: `mamba_selective_scan`, mamba_ssm's
# selective_scan_fn signature). Under torch.export transformers takes its PyTorch path, a Python loop over
# time: export would unroll it into a graph with one step per token, fixed to the example's length, whose
# backward touches the whole sequence at every step. While capturing, it is the sparsify scan op instead.
SCAN_FUNCTION = "mamba_selective_scan"


def _scan_graph_form(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, **pytorch_path_options):
    """transformers' scan signature (its extra options choose among its PyTorch paths: moot for the op)."""
    return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# transformers' Mamba2-family chunked SSD scan (Mamba2, Bamba, FalconH1, GraniteMoeHybrid, Zamba2, NemotronH:
# `mamba2_chunk_scan`, mamba_ssm's mamba_chunk_scan_combined signature). Under torch.export transformers always
# takes its PyTorch path, which pads the sequence to a multiple of the chunk size and reshapes it into chunks:
# a graph valid for one padding class and chunk count, captured again at other lengths. While capturing it is
# the sparsify SSD scan op: `ssd_scan`, or `ssd_scan_with_state` where a state goes in or out (a generation
# prefill). Packed sequences (seq_idx, cu_seqlens) keep transformers' own function: the ops do not take them.
CHUNK_SCAN_FUNCTION = "mamba2_chunk_scan"


def _chunk_scan_graph_form(original):
    def chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                   dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **kwargs):
        if any(v is not None for v in kwargs.values()):
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, z=z, **kwargs)
        return ssd_scan_fn(hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                           return_final_states)
    return chunk_scan


# function name -> its graph form, made from transformers' own function (the chunk scan falls back to it)
GRAPH_FORMS = {SCAN_FUNCTION: lambda original: _scan_graph_form, CHUNK_SCAN_FUNCTION: _chunk_scan_graph_form}


@contextmanager
def graph_forms():
    """While sparsify captures: the Mamba-family scans of every loaded transformers model module are the
    sparsify ops (one opaque op, any sequence length); restored on exit."""
    replaced = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models."):
            continue
        for function, graph_form in GRAPH_FORMS.items():
            original = getattr(module, function, None)
            if callable(original):
                setattr(module, function, graph_form(original))
                replaced.append((module, function, original))
    try:
        yield
    finally:
        for module, function, original in replaced:
            setattr(module, function, original)


def write_files(model, directory) -> None:
    """config.json beside the weights: `sparsify.load` rebuilds the model from it without its code."""
    model.config.save_pretrained(directory)


FRONTEND = Frontend(name="huggingface", matches=is_hf_model, example_inputs=example_inputs,
                    call_defaults=call_defaults, graph_forms=graph_forms, describe=describe, rebuild=rebuild,
                    write_files=write_files, cache_args=CACHE_ARGS)
